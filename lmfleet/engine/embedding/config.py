"""What an embedding model's folder prescribes, read without torch: how token states become one vector
(`Pooling`, `pooling_of`: a sentence-transformers folder's `modules.json`, `1_Pooling/config.json` and `Normalize`
module; mean pooling and L2 normalization for a plain folder), whether a folder is a sentence-transformers one
(`is_sentence_transformers`, which `--engine auto` asks) and which shorter vectors a client may ask for
(`matryoshka_of`: `is_matryoshka` or `matryoshka_dimensions` in its `config.json`, as vLLM reads them, or the
operator's `--matryoshka`). Does not own: loading the model (lmfleet.engine.embedding), pooling the vectors
(lmfleet.engine.embedding.engine).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
