"""The raw-decode baseline of `lmfleet bench --raw`: a model's own aligned-batch greedy decode, in process, with no
scheduler and no server, so a served figure can be read as a fraction of what the model can do.

Owns `raw_decode` (random prompts of one length, one prefill forward, then one decode forward per token with a
KV cache, argmax each step) and `load_model`. Imports torch and transformers only inside the calls: `lmfleet.bench`
stays importable without them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


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
