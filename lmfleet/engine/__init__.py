"""Token ids in, token ids (or vectors) out: the engine boundary (`base`), the asyncio bridges (`runner` for
generation, `pooling` for embeddings), the model a `--model-path` names (`source`) and the choice of engine for it
(`registry`), the engines (`llamacpp`, `transformers`, `embedding`), the bookkeeping the generating engines share
(`sequences`: queue, admission, aborts, finishing, outputs) and the grammars that constrain their sampling
(`grammar`, llguidance; imported by the worker, never by the engines, which see only `base.TokenConstraint`).

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
