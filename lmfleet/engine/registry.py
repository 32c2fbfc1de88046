"""Which engine serves a model, and where the model's files are.

Owns
  * `locate(model_path)`: what `--model-path` names (a `ModelSource`, lmfleet.engine.source), checked before
    anything loads, with one line saying what was expected when it names nothing usable: a `.gguf` file, a folder
    holding one `.gguf`, a Hugging Face model folder (`config.json`; a sentence-transformers folder, with
    `modules.json`, or a cross-encoder is a pooling model), or a hub id (`org/name`) for transformers to find in
    its cache.
  * `ENGINES`: engines by name (`--engine NAME`), each owning its settings and its loader; `auto` picks llama.cpp
    for GGUF, the embedding engine for sentence-transformers folders and transformers for other Hugging Face
    folders and hub ids (`--engine embedding` serves any other encoder as an embedding model). `--engine
    transformers` on a GGUF loads it through transformers, dequantized.

Adding an engine is adding an entry: a package `lmfleet.engine.<name>` whose `__init__` defines a settings
dataclass (extending `BatchSettings`) and `load(source, settings) -> LoadedModel`, and imports nothing heavy, so
the CLI can build settings without loading torch or llama.cpp. Nothing in an engine package imports this module
(tests/engine/test_imports.py keeps the engine package free of import cycles).

Larger than one host (a design note; no code path here, README "On paper, for GPUs"): a GPU engine such as vLLM
would be one more entry, `vllm`, whose settings add tensor/pipeline parallel sizes and the executor backend, and
whose `load` starts vLLM's own multi-node executor (Ray, or its multiprocessing backend with headless followers)
on the head host and wraps the engine core's step behind the same `Engine` protocol (prompt token ids in, new
token ids out). Only the head runs the lmfleet worker, so the whole multi-host model registers as one worker and
nothing above the engine boundary changes; a lost rank fails the engine, and the worker leaves the fleet as any
failed worker does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmfleet.engine import embedding, llamacpp, transformers
from lmfleet.engine.base import BatchSettings, LoadedModel
from lmfleet.engine.embedding import config as embedding_config
from lmfleet.engine.source import ModelSource

AUTO = "auto"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(ValueError):
    """The model cannot be served as asked (nothing loadable at the path, its engine not installed); the message
    says in one line what was expected."""


def locate(model_path: str) -> ModelSource:
    """The model `model_path` names; ModelError (one line) when it names nothing loadable."""
    expected = "expected a .gguf file, a folder holding one, a Hugging Face model folder, or a hub id (org/name)"
    path = Path(model_path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{model_path} is a file but not a .gguf file: {expected}")
        return ModelSource(model_path, "gguf", path.resolve())
    if path.is_dir():
        if (path / "config.json").is_file():
            st = embedding_config.is_pooling_model(path)
            return ModelSource(model_path, "st-folder" if st else "folder", path.resolve())
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(model_path, "gguf", ggufs[0].resolve())
        if ggufs:
            names = ", ".join(g.name for g in ggufs)
            raise ModelError(f"{model_path} holds several .gguf files ({names}): name one of them")
        raise ModelError(f"{model_path} has neither a config.json nor a .gguf file: {expected}")
    if _HUB_ID.match(model_path) and not model_path.startswith((".", "~")):
        return ModelSource(model_path, "hub")
    raise ModelError(f"{model_path} does not exist: {expected}")


@dataclass(frozen=True)
class EngineEntry:
    name: str
    settings: type[Any]  # a dataclass with BatchSettings' fields
    load: Callable[[ModelSource, Any], LoadedModel]
    auto_for: frozenset[str]  # the ModelSource kinds `--engine auto` gives this engine
    requires: str  # the module it needs at load time, and the extra that installs it
    extra: str


ENGINES: dict[str, EngineEntry] = {
    "llamacpp": EngineEntry(
        "llamacpp",
        llamacpp.LlamaCppSettings,
        lambda source, settings: llamacpp.load(str(source.path), settings),
        frozenset({"gguf"}),
        "llama_cpp",
        "llamacpp",
    ),
    "transformers": EngineEntry(
        "transformers",
        transformers.TransformersSettings,
        transformers.load,
        frozenset({"folder", "hub"}),
        "torch",
        "transformers",
    ),
    "embedding": EngineEntry(
        "embedding",
        embedding.EmbeddingSettings,
        embedding.load,
        frozenset({"st-folder"}),
        "torch",
        "transformers",
    ),
}


def choose(source: ModelSource, engine: str = AUTO) -> EngineEntry:
    """The engine for `source`: the one named, or under `auto` the one for its kind. ValueError for an unknown
    name or a pairing that cannot work (llama.cpp reads GGUF only)."""
    if engine == AUTO:
        return next(e for e in ENGINES.values() if source.kind in e.auto_for)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {AUTO}, {', '.join(ENGINES)}")
    entry = ENGINES[engine]
    if entry.name == "llamacpp" and source.kind != "gguf":
        raise ModelError(f"the llamacpp engine reads .gguf files; {source.given} is a {source.kind}")
    if entry.name == "embedding" and source.kind == "gguf":
        raise ModelError(f"the embedding engine reads Hugging Face folders; {source.given} is a .gguf file")
    return entry


def load(source: ModelSource, entry: EngineEntry, settings: BatchSettings) -> LoadedModel:
    """Load `source` with `entry`; ModelError naming the extra to install when the engine's library is missing."""
    import importlib.util

    if importlib.util.find_spec(entry.requires) is None:
        raise ModelError(
            f"the {entry.name} engine needs the {entry.requires!r} package: pip install 'lmfleet[{entry.extra}]'"
        )
    loaded = entry.load(source, settings)
    loaded.engine_name = loaded.engine_name or entry.name
    return loaded
