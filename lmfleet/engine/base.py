"""The engine boundary: token ids in, token ids out.

An engine owns a model and a scheduler. It knows nothing of HTTP, JSON or text: callers hand it prompt token ids
with per-request sampling parameters, call `step()` repeatedly, and get back, per request, the token ids generated
since the last step and, once, why the request finished.

An engine is single-threaded: `add_request`, `abort_request` and `step` are called from one thread.
`lmfleet.engine.runner.AsyncEngine` is the one wrapper that owns that thread and bridges it to asyncio.

Whether a request fits (a non-empty prompt, ids inside the vocabulary, prompt + max_new_tokens within
`max_model_len`, a request id not in use) is checked once, by the worker, before the request reaches the engine;
the engine only asserts it (in `lmfleet.engine.sequences`, the bookkeeping the engines share). An engine refuses
what it cannot run with `EngineRejected` and a `Rejection`; the worker maps the reason to the public error.

A loader (`lmfleet.engine.registry`) hands the worker a `LoadedModel`: the engine and the `Tokenizer` that goes
with its vocabulary. A pooling model's engine is an `EmbeddingEngine` instead (token ids in, one vector per
sequence out), and a cross-encoder's a `ScoringEngine` (a pair's token ids in, one score out);
`lmfleet.engine.pooling` batches the inputs of concurrent requests for either.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable


class FinishReason(str, enum.Enum):
    """Why a request left the engine. The one set of finish reasons: the worker's wire format spells these."""

    STOP = "stop"  # an end-of-sequence or stop token was sampled (or, above the engine, a stop string matched)
    LENGTH = "length"  # max_new_tokens reached, or the model's context is full
    ABORT = "abort"  # abort_request() was called (client gone, stop string matched above the engine)
    ERROR = "error"  # the engine failed this request


class Rejection(str, enum.Enum):
    """Why an engine, or the runner in front of it, refuses a request at admission."""

    QUEUE_FULL = "queue_full"  # capacity: as many requests as allowed are in flight; retry later
    NOT_RUNNING = "not_running"  # the engine is stopping or has failed
    DUPLICATE_ID = "duplicate_id"  # a request with this id is in flight
    UNSUPPORTED = "unsupported"  # a parameter this engine cannot honour


class EngineRejected(Exception):
    """An engine's refusal of one request: a `Rejection` and a sentence for the log and the client."""

    def __init__(self, reason: Rejection, detail: str = "") -> None:
        super().__init__(detail or reason.value)
        self.reason = reason
        self.detail = detail or reason.value


# The largest seed every engine takes (torch.Generator and llama.cpp's samplers take 64 bits; llama.cpp's
# LLAMA_DEFAULT_SEED, 0xFFFFFFFF, means "random", so engines fold seeds into their own range).
SEED_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class BatchSettings:
    """The scheduling limits every batching engine takes; each engine's settings extend these."""

    max_num_seqs: int = 16  # sequences decoded together in one step
    max_batch_tokens: int = 1024  # prompt tokens prefilled per step
    max_model_len: int | None = None  # cap on prompt + output tokens; None: the model's own context
    prefix_cache: bool = True  # keep finished requests' prefixes for later requests that share them
    prefix_cache_host_bytes: int | None = None  # the prefix cache's host-memory tier; None: sized from the machine

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_batch_tokens < 1:
            raise ValueError("max_num_seqs and max_batch_tokens must be positive")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")


class TokenConstraint(Protocol):
    """Which ids a request may generate next: a grammar over its output, built above the engine (by the worker, with
    lmfleet.engine.grammar) and carried on `SamplingParams.constraint`, one per request.

    Before sampling a constrained request's next token the engine takes `allowed()` and makes every other id
    impossible (its logit -inf), whatever the sampling parameters; after sampling it reports the id with
    `advance`. End-of-sequence ids are allowed only where the grammar is complete. Once `finished` (the grammar
    admits nothing more) the engine stops the request (STOP). A resumed request's constraint has already consumed
    the resumed ids (the worker advances it before admission), so preempting or recomputing a request never needs
    to roll it back. Unconstrained requests in the same batch are not touched."""

    def allowed(self) -> bytes:
        """The ids allowed next as a bitmask: bit `i % 32` of little-endian 32-bit word `i // 32` is id `i`. Ids
        past its end are not allowed."""
        ...

    def advance(self, token_id: int) -> bool:
        """Consume the sampled id; False if the grammar refuses it (the engine then fails the request)."""
        ...

    @property
    def finished(self) -> bool:
        """The grammar is complete and admits no further token but end-of-sequence."""
        ...


MAX_LOGPROBS = 20  # alternatives per token an engine reports at most (OpenAI's top_logprobs limit)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. `temperature == 0` means greedy; `top_k == 0`, `top_p == 1`, `min_p == 0` mean off."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None  # 0 <= seed <= SEED_MAX
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's end-of-sequence ids
    ignore_eos: bool = False
    # A grammar the output must follow (structured output, forced tool calls); stateful, one per request.
    constraint: TokenConstraint | None = field(default=None, compare=False)
    # Log probabilities, from the model's raw next-token distribution (before temperature, penalties, bias and any
    # mask): None = off; k >= 0 = each generated token's, with the k most likely alternatives (`EngineOutput`).
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo), on the first output

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check(self, vocab_size: int) -> None:
        """EngineRejected(UNSUPPORTED) for values no engine can sample with (an engine's `add_request` calls it)."""
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or not 0 <= self.min_p <= 1:
            raise EngineRejected(
                Rejection.UNSUPPORTED, "need temperature >= 0, 0 < top_p <= 1, top_k >= 0, 0 <= min_p <= 1"
            )
        if not (math.isfinite(self.presence_penalty) and math.isfinite(self.frequency_penalty)):
            raise EngineRejected(Rejection.UNSUPPORTED, "penalties must be finite")
        if any(k is not None and not 0 <= k <= MAX_LOGPROBS for k in (self.logprobs, self.prompt_logprobs)):
            raise EngineRejected(Rejection.UNSUPPORTED, f"logprobs must be in [0, {MAX_LOGPROBS}]")
        if any(not 0 <= t < vocab_size for t, _ in self.logit_bias):
            raise EngineRejected(Rejection.UNSUPPORTED, f"logit_bias token ids must be in [0, {vocab_size})")


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log probability under the model's raw next-token distribution (the log-softmax of its logits),
    and the most likely tokens at that position as (id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class EngineOutput:
    """What one step produced for one request. `finish_reason` is set exactly once, on the last output.

    `new_token_ids` never contains the end-of-sequence or stop token that finished a request: a request that
    stops on one gets a last output with `finish_reason=STOP` and possibly no new ids, so the text layer never
    sees them. With `ignore_eos`, end-of-sequence ids are ordinary tokens and are returned. `error` is set only
    with `finish_reason=ERROR`.

    With `SamplingParams.logprobs`, `logprobs` has one entry per id of `new_token_ids`; with `prompt_logprobs`, the
    request's first output has `prompt_logprobs`: one entry per prompt token, None for the first (nothing predicts
    it).
    """

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # On a request's first output: how many leading prompt tokens were served from the prefix cache (not computed);
    # None on later outputs and from engines without a prefix cache.
    cached_tokens: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine, taken after each step (the worker's load report and its /metrics). The counters
    run from the engine's start."""

    running: int  # sequences in the batch
    waiting: int  # admitted, not yet in the batch
    tokens_in_flight: int  # tokens held in the KV cache across running sequences
    kv_capacity: int | None = None  # tokens the KV cache can hold across sequences; None: unknown
    prefill_tokens: int = 0  # prompt tokens computed (a prefix-cache hit is not computed)
    decode_tokens: int = 0  # tokens decoded, one per running sequence per step
    preemptions: int = 0  # sequences pushed out of a full KV cache, to be recomputed later
    # The prefix cache (vLLM's names): prompt tokens looked up, and of those found cached; bytes its entries hold in
    # the KV cache and in host memory (the second tier)
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_kv_bytes: int = 0
    prefix_cache_host_bytes: int = 0
    # Speculative decoding: draft tokens proposed to the model, and of those accepted (the acceptance rate's parts)
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

    @property
    def kv_cache_usage(self) -> float | None:
        """The fraction of the KV cache in use, 0..1; None when the capacity is unknown."""
        if not self.kv_capacity:
            return None
        return min(self.tokens_in_flight / self.kv_capacity, 1.0)


class Engine(Protocol):
    """What every engine (transformers, llama.cpp, GPU engines) provides."""

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + generated) a request may reach."""
        ...

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1."""
        ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; it joins the running batch at a later step. The request fits (see the module
        docstring); raises `EngineRejected` for anything else it cannot run. Never refuses for capacity: a request
        that fits waits its turn."""
        ...

    def abort_request(self, request_id: str) -> None:
        """Drop a request at the next step; its last output has finish_reason ABORT. Unknown ids are ignored."""
        ...

    def step(self) -> list[EngineOutput]:
        """Schedule, run one forward pass over the batch, sample, update. Returns one output per request touched.

        A failure of the model fails the affected requests (final output with finish_reason ERROR), not the engine.
        """
        ...

    def has_unfinished_requests(self) -> bool: ...

    def stats(self) -> EngineStats: ...


# The chat template of a model that ships none: one "role: content" line per message, then "assistant:".
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """The model's chat template refuses these messages (a role it does not know, a bad order)."""


class Tokenizer(Protocol):
    """Text ↔ token ids for one model: what the worker's text layer (lmfleet.worker.textgen) uses, and what every
    loader hands it beside the engine. Special tokens typed inside message text never become control tokens."""

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def __len__(self) -> int: ...

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """A document's ids (BOS first where the model uses one when `add_special_tokens`)."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...

    @property
    def chat_template(self) -> str | None:
        """The model's own chat template source (None: the fallback is used)."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes (possibly part of a UTF-8 character; a control token's text), for log probabilities."""
        ...

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """The ids of a chat prompt through the model's own chat template (or a documented fallback), `tools` (OpenAI
        function definitions) passed to the template as `tools`, `template_kwargs` as more template variables (e.g.
        `enable_thinking`; their names never clash with the template's own, the worker's request checked them;
        control tokens inside their strings stay text). Raises `ChatTemplateError` when the template refuses the
        messages."""
        ...

    def grammar_vocabulary(self) -> Any:
        """llguidance's `LLTokenizer` for this vocabulary (lmfleet.engine.grammar builds constraints with it); built
        on first use (about a second), then cached."""
        ...


@runtime_checkable
class EmbeddingEngine(Protocol):
    """A pooling model: token ids in, one vector per sequence out. Single-threaded like `Engine`; the inputs fit
    (non-empty, ids inside the vocabulary, at most `max_model_len` each: the worker checked), the engine asserts it.
    """

    @property
    def max_model_len(self) -> int:
        """Longest input sequence; longer inputs are refused above the engine, never truncated."""
        ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def dimensions(self) -> int:
        """Length of every vector `embed` returns."""
        ...

    @property
    def matryoshka_dimensions(self) -> tuple[int, ...] | None:
        """Which shorter vectors a client may ask for (truncated, then L2-normalized again): None: none (the model
        was not trained for it); (): any length up to `dimensions`; otherwise exactly these lengths."""
        ...

    @property
    def max_num_seqs(self) -> int:
        """Most sequences in one `embed` call."""
        ...

    @property
    def max_batch_tokens(self) -> int:
        """Most padded tokens (longest sequence x sequences) in one `embed` call; a single sequence always fits."""
        ...

    def embed(self, batch: list[list[int]]) -> list[list[float]]:
        """One forward over `batch`: a vector per sequence, pooled and normalized as the model prescribes."""
        ...


class TokenPair(NamedTuple):
    """Two texts as a cross-encoder reads them together: the ids the tokenizer joined them into (its special tokens
    included) and, per id, the segment it belongs to (0 the first text, 1 the second; all 0 for a tokenizer
    without segments)."""

    ids: list[int]
    segments: list[int]


@runtime_checkable
class PairTokenizer(Protocol):
    """A tokenizer that joins two texts into one input, as a cross-encoder was trained on them."""

    def encode_pair(self, first: str, second: str) -> TokenPair:
        """The pair's ids with the model's special tokens, never truncated."""
        ...


@runtime_checkable
class ScoringEngine(Protocol):
    """A cross-encoder: a (query, document) pair's token ids in, one relevance score out (the classifier's single
    logit through the model's activation). Single-threaded like `Engine`; the pairs fit (ids inside the vocabulary,
    at most `max_model_len` each: the worker checked), the engine asserts it."""

    @property
    def max_model_len(self) -> int:
        """Longest pair (both texts and the special tokens); longer pairs are refused above the engine."""
        ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_num_seqs(self) -> int:
        """Most pairs in one `score` call."""
        ...

    @property
    def max_batch_tokens(self) -> int:
        """Most padded tokens (longest pair x pairs) in one `score` call; a single pair always fits."""
        ...

    def score(self, batch: list[TokenPair]) -> list[float]:
        """One forward over `batch`: a score per pair."""
        ...


@dataclass
class LoadedModel:
    """What a loader returns: the engine, its tokenizer, and one line saying what was loaded."""

    engine: Engine | EmbeddingEngine | ScoringEngine
    tokenizer: Tokenizer
    description: str = ""  # one line for the log: engine, model, dtype or quantization, context, size
    engine_name: str = ""  # the registry's name for the engine (lmfleet.engine.registry sets it)
