"""How much batching concurrent embedding requests buys: N single-sentence requests at once through the embedding
runner over the real all-MiniLM-L6-v2, with up to 1, 8 and 32 inputs per forward (in process, no HTTP).

    python scripts/bench_embeddings.py [N]
"""

from __future__ import annotations

import asyncio
import sys
import time

from lmfleet import models
from lmfleet.engine import embedding, registry
from lmfleet.engine.pooling import EmbeddingRunner


async def run(n: int, max_num_seqs: int) -> float:
    source = registry.locate(str(models.packaged("all-minilm-l6-v2")))
    loaded = registry.load(
        source, registry.ENGINES["embedding"], embedding.EmbeddingSettings(max_num_seqs=max_num_seqs)
    )
    texts = [f"Sentence number {i} says something about item {i * 7 % 13} of the list." for i in range(n)]
    seqs = [loaded.tokenizer.encode(t) for t in texts]
    runner = EmbeddingRunner(loaded.engine)  # type: ignore[arg-type]
    runner.start()
    try:
        await runner.embed(seqs[:4])  # warm up
        started = time.perf_counter()
        await asyncio.gather(*(runner.embed([s]) for s in seqs))
        return n / (time.perf_counter() - started)
    finally:
        await runner.stop()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    for seqs in (1, 8, 32):
        print(f"max_num_seqs={seqs:>2}: {asyncio.run(run(n, seqs)):7.1f} inputs/s ({n} concurrent requests)")


if __name__ == "__main__":
    main()
