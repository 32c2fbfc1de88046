"""Token ids in, token ids (or vectors) out: the engine boundary (`base`), the asyncio bridges (`runner` for
generation, `pooling` for embeddings), the choice of engine (`registry`) and the engines (`llamacpp`,
`transformers`, `embedding`).

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
