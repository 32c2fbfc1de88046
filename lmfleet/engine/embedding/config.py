"""What a pooling model's folder prescribes, read without torch: how token states become one vector (`Pooling`,
`pooling_of`: a sentence-transformers folder's `modules.json`, `1_Pooling/config.json` and `Normalize` module; mean
pooling and L2 normalization for a plain folder), whether a folder is a pooling model at all (`is_pooling_model`,
which `--engine auto` asks: a sentence-transformers folder or a cross-encoder), how a cross-encoder scores
(`is_cross_encoder`, `scoring_of`: its activation as sentence-transformers applies it) and which shorter vectors a
client may ask for (`matryoshka_of`: `is_matryoshka` or `matryoshka_dimensions` in its `config.json`, as vLLM reads
them, or the operator's `--matryoshka`). Does not own: loading the model (lmfleet.engine.embedding), pooling or
scoring (lmfleet.engine.embedding.engine).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
class Pooling:
    """How token states become one vector: `mode` (one of POOLING_MODES), then L2 normalization or not."""

    mode: str = "mean"
    normalize: bool = True
    max_seq_length: int | None = None  # sentence-transformers' own input limit, when the folder sets one


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object; {} when there is no such file."""
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
        return read_json(folder / "config_sentence_transformers.json").get("model_type") == "CrossEncoder"
    config = read_json(folder / "config.json")
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
        task = read_json(folder / "sentence_bert_config.json").get("transformer_task", "sequence-classification")
        if names != ["Transformer"] or task != "sequence-classification":
            raise PoolingConfigError(
                f"{folder}: a cross-encoder of {', '.join(names)} ({task}) is not supported; "
                "one sequence-classification Transformer"
            )
        st = read_json(folder / "config_sentence_transformers.json")
        if st.get("default_prompt_name"):
            raise PoolingConfigError(f"{folder}: a default prompt ({st['default_prompt_name']}) is not supported")
        limit = read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    config = read_json(folder / "config.json")
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
        config = read_json(folder / kinds["pooling"] / "config.json")
        on = [k for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
        if len(on) != 1 or on[0] not in _POOLING_KEYS:
            raise PoolingConfigError(
                f"{folder}: pooling {', '.join(on) or 'none'} is not supported; one of {', '.join(POOLING_MODES)}"
            )
        mode = _POOLING_KEYS[on[0]]
    limit = read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    return Pooling(mode, "normalize" in kinds, int(limit) if limit else None)


def matryoshka_of(config: dict[str, Any], operator_allows: bool) -> tuple[int, ...] | None:
    """`EmbeddingEngine.matryoshka_dimensions` from a model's `config.json` and the operator's flag."""
    listed = config.get("matryoshka_dimensions")
    if listed:
        return tuple(sorted(int(d) for d in listed))
    return () if operator_allows or config.get("is_matryoshka") else None
