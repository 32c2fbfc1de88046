"""The embedding engine: a transformers encoder (`AutoModel`) behind the `EmbeddingEngine` protocol, and a
cross-encoder (`AutoModelForSequenceClassification`, a reranker) behind the `ScoringEngine` protocol.

Owns its settings (`EmbeddingSettings`), reading how the model pools and normalizes (`pooling_of`: a
sentence-transformers folder's `modules.json`, `1_Pooling/config.json` and `Normalize` module; mean pooling and L2
normalization for a plain folder), recognizing a cross-encoder and reading how it scores (`is_cross_encoder`,
`scoring_of`: its activation as sentence-transformers applies it), and `load`. This module imports no torch:
`engine` does, when `load` runs.

`--engine auto` picks this engine for a sentence-transformers folder (one with `modules.json`) and for a
cross-encoder folder; `--engine embedding` serves any other encoder folder with mean pooling + L2. Shorter vectors
(`dimensions`) are allowed when the model says it was trained for them (Matryoshka: `is_matryoshka` or
`matryoshka_dimensions` in its `config.json`, as vLLM reads them) or the operator says so (`--matryoshka`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmfleet.engine.base import LoadedModel
from lmfleet.engine.transformers import TransformersSettings

if TYPE_CHECKING:
    from lmfleet.engine.registry import ModelSource

logger = logging.getLogger("lmfleet.engine")

POOLING_MODES = ("mean", "cls", "max", "lasttoken")
_POOLING_KEYS = {  # sentence-transformers' 1_Pooling/config.json switches
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}
_ST_MODULES = {  # sentence-transformers module types this engine runs, by their last name
    "Transformer": "transformer",
    "Pooling": "pooling",
    "Normalize": "normalize",
}


class PoolingConfigError(ValueError):
    """The folder's sentence-transformers pipeline has a step this engine does not run (a Dense layer, ...)."""


@dataclass(frozen=True)
class EmbeddingSettings(TransformersSettings):
    """`max_num_seqs`: inputs in one forward; `max_batch_tokens`: padded tokens (longest input x inputs) in one
    forward; `max_model_len`: a cap on the input length below the model's own."""

    matryoshka: bool = False  # the operator allows `dimensions` (truncate + renormalize) for any length


@dataclass(frozen=True)
class Pooling:
    """How token states become one vector: `mode` (one of POOLING_MODES), then L2 normalization or not."""

    mode: str = "mean"
    normalize: bool = True
    max_seq_length: int | None = None  # sentence-transformers' own input limit, when the folder sets one


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def is_sentence_transformers(folder: Path) -> bool:
    return (folder / "modules.json").is_file()


def is_pooling_model(folder: Path) -> bool:
    """A folder this engine serves under `--engine auto`: a sentence-transformers one, or a cross-encoder."""
    return is_sentence_transformers(folder) or is_cross_encoder(folder)


# -- cross-encoders ----------------------------------------------------------------------------------------------

ACTIVATIONS = ("sigmoid", "identity", "tanh")
_TORCH_ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity", "Tanh": "tanh"}  # by their class name


@dataclass(frozen=True)
class Scoring:
    """How a cross-encoder's one logit becomes a score: `activation` (one of ACTIVATIONS) over it."""

    activation: str = "sigmoid"
    max_seq_length: int | None = None  # sentence-transformers' own input limit, when the folder sets one


def _classifier(config: dict[str, Any]) -> bool:
    return any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def _labels(config: dict[str, Any]) -> int:
    return int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)  # transformers' default: 2


def is_cross_encoder(folder: Path) -> bool:
    """A folder sentence-transformers loads as a `CrossEncoder` over a sequence classifier: one it saved as one
    (`config_sentence_transformers.json` says `"model_type": "CrossEncoder"`), or, without `modules.json`, a
    `*ForSequenceClassification` model that its config marks as one (the `sentence_transformers` key older versions
    wrote into `config.json`) or that has a single label (a reranker such as bge-reranker)."""
    if is_sentence_transformers(folder):
        return _read(folder / "config_sentence_transformers.json").get("model_type") == "CrossEncoder"
    config = _read(folder / "config.json")
    marked = "sentence_transformers" in config or "sbert_ce_default_activation_function" in config
    return _classifier(config) and (marked or _labels(config) == 1)


def _activation(path: Any, folder: Path) -> str | None:
    """sentence-transformers' activation `path` (a class's dotted name) as one of ACTIVATIONS; None where it would
    not use it either (no path, or one outside `torch.`: it falls back to its default unless remote code is
    trusted)."""
    if not path:
        return None
    if not str(path).startswith("torch."):
        logger.warning(
            "%s: activation %s is not torch's: the default is used (as sentence-transformers does)", folder, path
        )
        return None
    name = _TORCH_ACTIVATIONS.get(str(path).rsplit(".", 1)[-1])
    if name is None:
        raise PoolingConfigError(f"{folder}: the activation {path} is not supported; one of {', '.join(ACTIVATIONS)}")
    return name


def scoring_of(folder: Path) -> Scoring:
    """How a cross-encoder folder scores, read as sentence-transformers 6 reads it: the activation saved in
    `config_sentence_transformers.json` (a `modules.json` folder), else the one in `config.json`
    (`sentence_transformers.activation_fn`, or the older `sbert_ce_default_activation_function`), else a sigmoid.
    PoolingConfigError for a pipeline this engine does not run (a module besides the classifier, a default prompt)."""
    st: dict[str, Any] = {}
    limit = None
    if is_sentence_transformers(folder):
        modules = json.loads((folder / "modules.json").read_text())
        names = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        task = _read(folder / "sentence_bert_config.json").get("transformer_task", "sequence-classification")
        if names != ["Transformer"] or task != "sequence-classification":
            raise PoolingConfigError(
                f"{folder}: a cross-encoder of {', '.join(names)} ({task}) is not supported; "
                "one sequence-classification Transformer"
            )
        st = _read(folder / "config_sentence_transformers.json")
        if st.get("default_prompt_name"):
            raise PoolingConfigError(f"{folder}: a default prompt ({st['default_prompt_name']}) is not supported")
        limit = _read(folder / "sentence_bert_config.json").get("max_seq_length")
    config = _read(folder / "config.json")
    saved = (config.get("sentence_transformers") or {}).get("activation_fn") or config.get(
        "sbert_ce_default_activation_function"
    )
    activation = _activation(st.get("activation_fn"), folder) or _activation(saved, folder) or "sigmoid"
    return Scoring(activation, int(limit) if limit else None)


def pooling_of(folder: Path) -> Pooling:
    """The pooling a model folder prescribes. Without `modules.json`: mean pooling, L2-normalized."""
    if not is_sentence_transformers(folder):
        return Pooling()
    modules = json.loads((folder / "modules.json").read_text())
    kinds: dict[str, str] = {}
    for module in modules:
        name = str(module.get("type", "")).rsplit(".", 1)[-1]
        if name not in _ST_MODULES:
            raise PoolingConfigError(
                f"{folder}: the sentence-transformers module {module.get('type')!r} is not supported"
            )
        kinds[_ST_MODULES[name]] = str(module.get("path", ""))
    mode = "mean"
    if "pooling" in kinds:
        config = _read(folder / kinds["pooling"] / "config.json")
        on = [k for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
        if len(on) != 1 or on[0] not in _POOLING_KEYS:
            raise PoolingConfigError(
                f"{folder}: pooling {', '.join(on) or 'none'} is not supported; one of {', '.join(POOLING_MODES)}"
            )
        mode = _POOLING_KEYS[on[0]]
    limit = _read(folder / "sentence_bert_config.json").get("max_seq_length")
    return Pooling(mode, "normalize" in kinds, int(limit) if limit else None)


def matryoshka_of(config: dict[str, Any], operator_allows: bool) -> tuple[int, ...] | None:
    """`EmbeddingEngine.matryoshka_dimensions` from a model's `config.json` and the operator's flag."""
    listed = config.get("matryoshka_dimensions")
    if listed:
        return tuple(sorted(int(d) for d in listed))
    return () if operator_allows or config.get("is_matryoshka") else None


def load(source: ModelSource, settings: EmbeddingSettings) -> LoadedModel:
    import torch
    from transformers import AutoModel

    from lmfleet.engine.embedding.engine import PoolingEngine
    from lmfleet.engine.transformers.tokenizer import HFTokenizer

    folder = source.path  # None: a hub id in the local cache, read as a plain encoder
    if folder is not None and is_cross_encoder(folder):
        return _load_cross_encoder(folder, settings)
    pooling = pooling_of(folder) if folder is not None else Pooling()
    config = _read(folder / "config.json") if folder is not None else {}
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
