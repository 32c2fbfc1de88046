"""The raw-decode baseline of `lmfleet bench --raw`: a model's own aligned-batch greedy decode, in process, with no
scheduler and no server, so a served figure can be read as a fraction of what the model can do.

Owns `run_raw` (the report of `lmfleet bench --raw`: one batch size per level), `raw_decode` (random prompts of one
length, one prefill forward, then one decode forward per token with a KV cache, argmax each step) and `load_model`.
Imports torch and transformers only inside the calls: `lmfleet bench` stays importable without them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from lmfleet.bench.report import BenchReport, progress, status
from lmfleet.bench.settings import BenchError, BenchSettings
from lmfleet.bench.stats import LevelResult


@dataclass(frozen=True)
class RawRun:
    token_ids: list[list[int]]  # per prompt, the greedy ids decoded
    prompts: list[list[int]]
    seconds: float  # from the prefill to the last token

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


def load_model(path: str, *, dtype: str = "float32", device: str = "cpu") -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def raw_decode(model: Any, batch_size: int, *, prompt_len: int = 20, new_tokens: int = 64, seed: int = 0) -> RawRun:
    """`batch_size` random prompts of `prompt_len` tokens decoded greedily for `new_tokens` tokens each, end of
    sequence ignored. One untimed warm-up forward runs first."""
    import torch
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (batch_size, prompt_len), generator=gen).to(device)
    decoded: list[list[int]] = [[] for _ in range(batch_size)]
    with torch.inference_mode():
        model(input_ids=ids[:, :4], use_cache=False, logits_to_keep=1)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        tokens = out.logits[:, -1, :].argmax(dim=-1).tolist()
        for _ in range(new_tokens - 1):
            for row, t in zip(decoded, tokens, strict=True):
                row.append(t)
            nxt = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
            out = model(input_ids=nxt, cache=cache, use_cache=True, logits_to_keep=1)
            tokens = out.logits[:, -1, :].argmax(dim=-1).tolist()
        for row, t in zip(decoded, tokens, strict=True):
            row.append(t)
        seconds = time.perf_counter() - start
    return RawRun(decoded, ids.tolist(), seconds)


def run_raw(settings: BenchSettings) -> BenchReport:
    """Measure the raw decode at each level as the batch size, on the model at --model-path."""
    if not settings.model_path:
        raise BenchError("--raw needs --model-path")
    try:
        status(settings, f"loading {settings.model_path} ({settings.dtype}, {settings.device})")
        model = load_model(settings.model_path, dtype=settings.dtype, device=settings.device)
    except ImportError as exc:
        raise BenchError(f"--raw needs torch and transformers (pip install 'lmfleet[transformers]'): {exc}") from None

    prompt_len, new_tokens = settings.prompt_tokens, settings.max_tokens
    if settings.warmup:
        raw_decode(model, 1, prompt_len=prompt_len, new_tokens=min(new_tokens, 8))
    levels = []
    with progress(len(settings.concurrency), "raw decode", settings) as bar:
        for batch in settings.concurrency:
            run = raw_decode(model, batch, prompt_len=prompt_len, new_tokens=new_tokens)
            tok_s, out = run.tok_s, run.tokens
            levels.append(
                LevelResult(
                    concurrency=batch,
                    requests=batch,
                    ok=batch,
                    errors=0,
                    error_messages=[],
                    output_tokens=out,
                    prompt_tokens=batch * prompt_len,
                    duration_s=out / tok_s if tok_s > 0 else math.inf,
                    output_tok_s=tok_s,
                    requests_per_s=None,
                    ttft_ms=None,
                    itl_ms=None,
                    e2e_ms=None,
                    token_source={"exact": batch},
                )
            )
            bar.update(1)
    config = settings.public_config()
    for key in ("base_url", "model", "endpoint", "stream", "timeout", "requests", "requests_per_level", "prompt"):
        config.pop(key, None)
    return BenchReport(mode="raw", config=config, levels=levels)
