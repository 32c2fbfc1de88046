"""Token ids in, token ids out: the engine boundary (`base`), the asyncio bridge (`runner`), the choice of engine
(`registry`) and the engines (`llamacpp`, `transformers`).

Importing this package, the registry or an engine package's `__init__` imports neither torch nor llama.cpp; an
engine's `load` does.
"""

from lmfleet.engine.base import (
    Engine,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    SamplingParams,
)

__all__ = ["Engine", "EngineOutput", "EngineRequest", "EngineStats", "FinishReason", "SamplingParams"]
