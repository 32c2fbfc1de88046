"""The engine boundary: token ids in, token ids out.

An engine owns a model and a scheduler. It knows nothing of HTTP, JSON, text or tokenizers: callers hand it
prompt token ids with per-request sampling parameters, call `step()` repeatedly, and get back, per request,
the token ids generated since the last step and, once, why the request finished.

An engine is single-threaded: `add_request`, `abort_request` and `step` are called from one thread.
`lmfleet.engine.runner.AsyncEngine` is the one wrapper that owns that thread and bridges it to asyncio.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


class FinishReason(str, enum.Enum):
    """Why a request left the engine."""

    STOP = "stop"  # an end-of-sequence or stop token was sampled
    LENGTH = "length"  # max_new_tokens reached, or the model's context is full
    ABORT = "abort"  # abort_request() was called (client gone, stop string matched above the engine)
    ERROR = "error"  # the engine failed this request


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. `temperature == 0` means greedy; `top_k == 0` and `top_p == 1` mean off."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's end-of-sequence ids
    ignore_eos: bool = False


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class EngineOutput:
    """What one step produced for one request. `finish_reason` is set exactly once, on the last output.

    `new_token_ids` never contains the end-of-sequence or stop token that finished a request: a request that
    stops on one gets a last output with `finish_reason=STOP` and possibly no new ids, so the text layer never
    sees them. With `ignore_eos`, end-of-sequence ids are ordinary tokens and are returned. `error` is set only
    with `finish_reason=ERROR`.
    """

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    running: int  # sequences in the batch
    waiting: int  # admitted, not yet in the batch
    tokens_in_flight: int  # tokens held in the KV cache across running sequences


class Engine(Protocol):
    """What every engine (transformers, llama.cpp, GPU engines) provides."""

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + generated) a request may reach."""
        ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ...

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; it joins the running batch at a later step.

        Raises `lmfleet.errors.ContextLengthExceeded` if prompt + max_new_tokens exceeds `max_model_len`, and
        `lmfleet.errors.InvalidRequest` for anything else it cannot run (empty prompt, ids outside the vocabulary,
        a request id already in use). Never raises for capacity: a request that fits waits its turn.
        """
        ...

    def abort_request(self, request_id: str) -> None:
        """Drop a request at the next step; its last output has finish_reason ABORT. Unknown ids are ignored."""
        ...

    def step(self) -> list[EngineOutput]:
        """Schedule, run one forward pass over the batch, sample, update. Returns one output per request touched.

        A failure of the model fails the affected requests (final output with finish_reason ERROR), not the engine.
        """
        ...

    def has_unfinished_requests(self) -> bool:
        ...

    def stats(self) -> EngineStats:
        ...
