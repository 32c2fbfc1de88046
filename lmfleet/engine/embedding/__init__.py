"""The embedding engine: a transformers encoder (`AutoModel`) behind the `EmbeddingEngine` protocol.

Owns its settings (`EmbeddingSettings`) and `load`, which reads how the model pools and normalizes and which shorter
vectors it allows (`config`, from its folder) and returns the engine with its tokenizer. This module imports no
torch: `engine` does, when `load` runs.

`--engine auto` picks this engine for a sentence-transformers folder (one with `modules.json`); `--engine embedding`
serves any other encoder folder with mean pooling + L2. Shorter vectors (`dimensions`) are allowed when the model
says it was trained for them (Matryoshka: `is_matryoshka` or `matryoshka_dimensions` in its `config.json`, as vLLM
reads them) or the operator says so (`--matryoshka`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmfleet.engine.base import LoadedModel
from lmfleet.engine.embedding.config import Pooling, matryoshka_of, pooling_of, read_json
from lmfleet.engine.transformers import TransformersSettings

if TYPE_CHECKING:
    from lmfleet.engine.source import ModelSource

logger = logging.getLogger("lmfleet.engine")


@dataclass(frozen=True)
class EmbeddingSettings(TransformersSettings):
    """`max_num_seqs`: inputs in one forward; `max_batch_tokens`: padded tokens (longest input x inputs) in one
    forward; `max_model_len`: a cap on the input length below the model's own."""

    matryoshka: bool = False  # the operator allows `dimensions` (truncate + renormalize) for any length


def load(source: ModelSource, settings: EmbeddingSettings) -> LoadedModel:
    import torch
    from transformers import AutoModel

    from lmfleet.engine.embedding.engine import PoolingEngine
    from lmfleet.engine.transformers.tokenizer import HFTokenizer

    folder = source.path  # None: a hub id in the local cache, read as a plain encoder
    pooling = pooling_of(folder) if folder is not None else Pooling()
    config = read_json(folder / "config.json") if folder is not None else {}
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "auto" if settings.dtype == "auto" else getattr(torch, settings.dtype)
    model: Any = AutoModel.from_pretrained(source.display, dtype=dtype)
    model.to(device).eval()
    tokenizer = HFTokenizer.load(source.display)
    limits = [
        n
        for n in (
            pooling.max_seq_length,
            getattr(model.config, "max_position_embeddings", None),
            settings.max_model_len,
        )
        if n
    ]
    engine = PoolingEngine(
        model,
        pooling,
        max_model_len=min(limits) if limits else 512,
        pad_token_id=getattr(model.config, "pad_token_id", None) or 0,
        matryoshka_dimensions=matryoshka_of(config, settings.matryoshka),
        max_num_seqs=settings.max_num_seqs,
        max_batch_tokens=settings.max_batch_tokens,
    )
    params = sum(p.numel() for p in model.parameters())
    description = (
        f"engine=embedding model={source.display} pooling={pooling.mode}{'+l2' if pooling.normalize else ''} "
        f"dimensions={engine.dimensions} device={device} context={engine.max_model_len} "
        f"parameters={params / 1e6:.0f}M"
    )
    return LoadedModel(engine, tokenizer, description)
