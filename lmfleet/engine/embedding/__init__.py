"""The embedding engine: a transformers encoder (`AutoModel`) behind the `EmbeddingEngine` protocol, and a
cross-encoder (`AutoModelForSequenceClassification`, a reranker) behind the `ScoringEngine` protocol.

Owns its settings (`EmbeddingSettings`) and `load`, which reads what the folder prescribes (`config`: pooling,
normalization, shorter vectors; whether it is a cross-encoder and how it scores) and returns the engine with its
tokenizer. This module imports no torch: `engine` does, when `load` runs.

`--engine auto` picks this engine for a sentence-transformers folder (one with `modules.json`) and for a
cross-encoder folder; `--engine embedding` serves any other encoder folder with mean pooling + L2. Shorter vectors
(`dimensions`) are allowed when the model says it was trained for them (Matryoshka: `is_matryoshka` or
`matryoshka_dimensions` in its `config.json`, as vLLM reads them) or the operator says so (`--matryoshka`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmfleet.engine.base import LoadedModel
from lmfleet.engine.embedding.config import (
    Pooling,
    PoolingConfigError,
    is_cross_encoder,
    matryoshka_of,
    pooling_of,
    read_json,
    scoring_of,
)
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
    if folder is not None and is_cross_encoder(folder):
        return _load_cross_encoder(folder, settings)
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


_UNSET_LENGTH = 1 << 30  # transformers' model_max_length when a tokenizer sets none is larger than this


def _load_cross_encoder(folder: Path, settings: EmbeddingSettings) -> LoadedModel:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmfleet.engine.embedding.engine import CrossEncoderEngine
    from lmfleet.engine.transformers.tokenizer import HFTokenizer

    scoring = scoring_of(folder)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "auto" if settings.dtype == "auto" else getattr(torch, settings.dtype)
    model: Any = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=dtype)
    if model.config.num_labels != 1:
        raise PoolingConfigError(
            f"{folder}: this classifier has {model.config.num_labels} labels; a cross-encoder that scores has one"
        )
    model.to(device).eval()
    raw = AutoTokenizer.from_pretrained(str(folder))
    own = raw.model_max_length if raw.model_max_length < _UNSET_LENGTH else None
    limits = [
        n
        for n in (
            scoring.max_seq_length or own,
            getattr(model.config, "max_position_embeddings", None),
            settings.max_model_len,
        )
        if n
    ]
    engine = CrossEncoderEngine(
        model,
        scoring.activation,
        max_model_len=min(limits) if limits else 512,
        pad_token_id=getattr(model.config, "pad_token_id", None) or raw.pad_token_id or 0,
        segments="token_type_ids" in raw.model_input_names,
        max_num_seqs=settings.max_num_seqs,
        max_batch_tokens=settings.max_batch_tokens,
    )
    params = sum(p.numel() for p in model.parameters())
    description = (
        f"engine=embedding model={folder} cross-encoder activation={scoring.activation} device={device} "
        f"context={engine.max_model_len} parameters={params / 1e6:.0f}M"
    )
    return LoadedModel(engine, HFTokenizer(raw), description)
