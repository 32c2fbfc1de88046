"""The transformers engine: continuous batching over a Hugging Face causal LM, in PyTorch.

Owns its settings (`TransformersSettings`) and `load`, which reads a model folder, a hub id available locally, or a
GGUF file (dequantized by transformers) and returns the engine with its tokenizer. This module imports no torch:
`engine` (the batching engine) and `tokenizer` do, when `load` runs.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmfleet.engine.base import BatchSettings, LoadedModel

if TYPE_CHECKING:
    from lmfleet.engine.source import ModelSource

logger = logging.getLogger("lmfleet.engine")

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class TransformersSettings(BatchSettings):
    dtype: str = "auto"  # "auto": the checkpoint's own dtype
    device: str | None = None  # None: cuda when available, else cpu

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        if self.device is not None and self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}")


def load(source: ModelSource, settings: TransformersSettings) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from lmfleet.engine.transformers.engine import TransformersEngine
    from lmfleet.engine.transformers.tokenizer import HFTokenizer

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "auto" if settings.dtype == "auto" else getattr(torch, settings.dtype)
    folder, gguf_file = source.transformers_args()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if not sys.stderr.isatty():  # transformers' "Loading weights" bar on a terminal; none in a log file
        hf_logging.disable_progress_bar()
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    model.to(device)
    engine = TransformersEngine(
        model,
        max_num_seqs=settings.max_num_seqs,
        max_batch_tokens=settings.max_batch_tokens,
        max_model_len=settings.max_model_len,
        prefix_cache=settings.prefix_cache,
        prefix_cache_host_bytes=settings.prefix_cache_host_bytes,
    )
    tokenizer = HFTokenizer.load(folder, gguf_file=gguf_file, eos_token_ids=engine.eos_token_ids)
    params = sum(p.numel() for p in model.parameters())
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
    cache_budget = engine.prefix_cache_budget
    description = (
        f"engine=transformers model={source.display} dtype={dtype_name} "
        f"device={device} context={engine.max_model_len} "
        f"kv_cache=grows to {engine.max_num_seqs * engine.max_model_len} tokens "
        f"parameters={params / 1e6:.1f}M weights={size_mb:.0f}MB "
        f"max_num_seqs={settings.max_num_seqs} "
        f"prefix_cache={'off' if cache_budget is None else f'{cache_budget / 1e6:.0f}MB host'}"
    )
    return LoadedModel(engine, tokenizer, description)
