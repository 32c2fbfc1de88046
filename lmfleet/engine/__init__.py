"""Token ids in, token ids out: the engine boundary (`base`), the asyncio bridge (`runner`) and the engines.

Importing this package imports no torch; `lmfleet.engine.transformers` does.
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
