"""The internal wire format we own: API server ↔ worker, worker ↔ controller. Data only (pydantic, no I/O).

Worker ↔ controller uses FastChat's route names and field names (`/register_worker` with `worker_name`,
`check_heart_beat`, `worker_status`; `/receive_heart_beat` answering `{"exist": bool}`; `/list_models`;
`/get_worker_address`), so a FastChat model worker can register with an lmfleet controller. lmfleet adds
optional fields FastChat ignores (running/waiting/tokens in flight, context length, dispatch weight, the tasks
it serves: `generate`, the default a FastChat worker gets, `embed` or `score`; the protocol it speaks: `lmfleet`'s
routes below, or `fastchat`'s, lmfleet.protocol.fastchat). A status that does not name its protocol is a FastChat
worker's (`reported`): FastChat's workers report their model names, speed and queue length only.

API server → worker: `POST /worker/generate` with a `GenerateRequest`; the worker validates before it answers
(errors come back as a non-200 OpenAI error body), then streams `GenerateChunk`s as NDJSON, one JSON object per
line. Every chunk carries the token ids it adds, so a stream can be resumed on another replica from the ids the
API server has already seen (`GenerateRequest.prompt_token_ids` + `resume_token_ids`).

Resuming: the first chunk of a stream carries the prompt's token ids (`GenerateChunk.prompt_token_ids`; a chat
prompt is rendered by the worker, so the API server learns them only there). To continue a generation elsewhere
the API server sends `prompt_token_ids` = those ids, `resume_token_ids` = every id it received, the original
`max_tokens` (the worker counts the resumed ids against it) and `resume_text_chars` = how many characters of
generated text it has passed on. The worker decodes the resumed ids again, through the same stop strings, and
skips that many characters: text the dead worker was still holding back (half a UTF-8 character, a possible
stop-string prefix) is sent, nothing is sent twice. Without `resume_text_chars` the resumed ids are only context.
A choice that was streaming tool calls also says how far each announced call got (`resume_tool_chars`: characters
of its arguments delivered); the worker parses the resumed text again and sends only the rest. A request under a
grammar (`json_schema`, a forced tool call) has its grammar advanced through the resumed ids before it continues.

Structured output and tools: `json_schema` is the schema the output must follow (JSON mode: `{"type": "object"}`;
with `json_schema_strict`, as OpenAI's strict mode reads it: no property its object schemas do not declare);
`tools` are the functions in the prompt, `tool_choice` says whether the model may (`auto`) or must (`required`,
with `tool_name`: that one) call one; the worker renders them, enforces forced calls with a grammar and parses
calls out of the text into `GenerateChunk.tool_calls`.

Reasoning: a chat request says `split_reasoning`; a worker with a reasoning parser (lmfleet.worker.reasoning) then
sends the model's reasoning (`<think>…</think>`, the tags left out) as `GenerateChunk.reasoning` and only the
answer as `text`; tool calls are parsed from, and a grammar constrains, only what follows the reasoning.
`reasoning_tokens` counts the ids of the reasoning. A resumed request also says how many characters of reasoning
were delivered (`resume_reasoning_chars`). `chat_template_kwargs` are more variables for the chat template (e.g.
`enable_thinking`, `reasoning_effort`).

One-reply routes (JSON in, JSON out): `POST /worker/embed` (`EmbedRequest` -> `EmbedResponse`, embedding workers
only), `POST /worker/score` (`ScorePairsRequest` -> `ScorePairsResponse`: a cross-encoder's worker, or an
embedding model's), `POST /worker/tokenize` (`TokenizeRequest` -> `TokenizeResponse`) and `POST
/worker/detokenize` (`DetokenizeRequest` -> `DetokenizeResponse`), through the worker's own tokenizer.

Log probabilities of resumed ids are not sent again (the new worker sends those of the ids it generates).

Log probabilities (`GenerateRequest.logprobs` = k alternatives): every chunk then has `logprobs`, one `TokenLogprob`
per id of `token_ids` (token text and bytes spelled by the worker), and with `echo` the chunk carrying the prompt's
text has one per prompt token instead (the first with `logprob` None).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from lmfleet.protocol.errors import ErrorInfo

# lmfleet.engine.base.FinishReason's values, as the wire spells them.
FinishReason = Literal["stop", "length", "abort", "error", "tool_calls"]
# What a worker serves: `generate` (chat and text completions), `embed` (embeddings), `score` (rerank and score).
Task = Literal["generate", "embed", "score"]
# What a worker speaks: lmfleet's `/worker/generate` (token ids, resumable) or FastChat's `/worker_generate_stream`.
LMFLEET, FASTCHAT = "lmfleet", "fastchat"

# Bounds on what a peer may report or ask for, so no message can overflow a float, a tensor or a generator seed.
MAX_COUNT = 10_000_000  # FastChat's queue length
MAX_REPORTED = 1 << 40  # running, waiting, tokens in flight, context length
MAX_TOKEN_ID = (1 << 31) - 1
SEED_MAX = (1 << 64) - 1  # seeds are unsigned 64-bit, as every engine takes them (lmfleet.engine.base.SEED_MAX)
MAX_LOGIT_BIAS = 1024  # entries; OpenAI allows 300
MAX_LOGPROBS = 20  # alternatives per token (lmfleet.engine.base.MAX_LOGPROBS)
ModelName = Annotated[str, Field(min_length=1, max_length=1024)]


ModelLoadState = Literal["loaded", "loading", "unloaded", "failed"]


class ModelState(BaseModel):
    """One model a worker can serve and where it stands (a worker that loads models on demand reports one per model;
    a one-model worker reports none, and its `model_names` are loaded)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    name: ModelName
    state: ModelLoadState
    tasks: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=lambda: ["generate"], min_length=1, max_length=16
    )
    engine: str | None = None
    pinned: bool = False
    memory_bytes: int = Field(default=0, ge=0, le=MAX_REPORTED)  # resident memory it holds now (0 when unloaded)
    load_seconds: float | None = Field(default=None, ge=0)  # how long its last load took
    context_length: int | None = Field(default=None, gt=0, le=MAX_REPORTED)


class WorkerStatus(BaseModel):
    """What a worker reports about itself. The first three fields are FastChat's. A worker that loads models on
    demand lists every model it can serve in `model_names` and each one's state in `models`."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model_names: list[ModelName] = Field(min_length=1, max_length=256)
    aliases: list[ModelName] = Field(default_factory=list, max_length=256)  # answered to when no other model claims it
    speed: float = Field(default=1.0, gt=0, le=1_000_000)  # relative capacity, used by the lottery policy
    queue_length: int = Field(default=0, ge=0, le=MAX_COUNT)  # running + waiting, FastChat's load number
    running: int = Field(default=0, ge=0, le=MAX_REPORTED)
    waiting: int = Field(default=0, ge=0, le=MAX_REPORTED)
    tokens_in_flight: int = Field(default=0, ge=0, le=MAX_REPORTED)
    kv_cache_usage: float | None = Field(default=None, ge=0, le=1)  # fraction of the KV cache in use; None: unknown
    context_length: int | None = Field(default=None, gt=0, le=MAX_REPORTED)
    engine: str | None = None  # "transformers", "llamacpp", ...
    # `Task`s; kept as plain names so a newer worker's task does not break its registration with an older controller
    tasks: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=lambda: ["generate"], min_length=1, max_length=16
    )
    protocol: str = Field(default=LMFLEET, min_length=1, max_length=64)  # LMFLEET or FASTCHAT (plain, as tasks)
    multimodal: bool = False  # FastChat's registration flag (its controller lists such models apart)
    models: list[ModelState] = Field(default_factory=list, max_length=256)  # per model, on a multi-model worker
    memory_budget_bytes: int | None = Field(default=None, ge=0, le=MAX_REPORTED)  # what it may hold in models


def reported(status: WorkerStatus) -> WorkerStatus:
    """A status as a worker sent it: one that does not name its protocol is a FastChat worker's."""
    if "protocol" in status.model_fields_set:
        return status
    return status.model_copy(update={"protocol": FASTCHAT})


class RegisterWorkerRequest(BaseModel):
    """`POST /register_worker` (FastChat-compatible)."""

    model_config = ConfigDict(extra="ignore")

    worker_name: str = Field(min_length=1, max_length=2048)  # the worker's base URL, e.g. http://127.0.0.1:21002
    check_heart_beat: bool = True
    worker_status: WorkerStatus | None = None  # FastChat lets the controller fetch it when omitted
    multimodal: bool = False


class HeartbeatRequest(BaseModel):
    """`POST /receive_heart_beat` (FastChat-compatible; `worker_status` is lmfleet's richer load report)."""

    model_config = ConfigDict(extra="ignore")

    worker_name: str = Field(min_length=1, max_length=2048)
    queue_length: int = Field(default=0, ge=0, le=MAX_COUNT)
    worker_status: WorkerStatus | None = None


class HeartbeatResponse(BaseModel):
    exist: bool  # False: the controller does not know this worker (it restarted): register again now


class WorkerAddressRequest(BaseModel):
    """`POST /get_worker_address`: answered with `{"address": url}`; `""` when no live worker serves the model."""

    model: str


class WorkerInfo(BaseModel):
    """One live worker as the controller sees it (`GET /workers`), for API-server caching and dashboards."""

    model_config = ConfigDict(protected_namespaces=())

    address: str
    status: WorkerStatus
    last_heartbeat: float  # controller clock, seconds


class ChatMessageIn(BaseModel):
    """A chat message as the worker needs it to render the chat template. Content parts are already text."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | None = None


class ToolFunction(BaseModel):
    """A function the model may call (OpenAI's `tools[].function`)."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no parameters


# Names a chat template's renderer gives meaning to itself (transformers' `apply_chat_template` arguments, the
# template's own variables and helpers): template kwargs may not replace them.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "messages", "conversation", "tools", "documents", "add_generation_prompt", "continue_final_message",
        "chat_template", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
        "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "raise_exception",
        "strftime_now", "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
        "additional_special_tokens",
    }
)  # fmt: skip
MAX_TEMPLATE_KWARGS = 32


def _template_kwargs(value: dict[str, Any]) -> dict[str, Any]:
    for name in value:
        if not name.isidentifier() or len(name) > 64:
            raise ValueError(f"{name[:64]!r} is not a template variable name")
        if name in RESERVED_TEMPLATE_KWARGS:
            raise ValueError(f"{name!r} is set by the server, not by chat_template_kwargs")
    return value


# More variables for a chat template (`enable_thinking`, `reasoning_effort`, ...): names that are identifiers and
# not the renderer's own.
TemplateKwargs = Annotated[dict[str, Any], Field(max_length=MAX_TEMPLATE_KWARGS), AfterValidator(_template_kwargs)]


class GenerateRequest(BaseModel):
    """`POST /worker/generate`. Exactly one of `prompt`, `messages`, `prompt_token_ids` is set."""

    request_id: str = Field(min_length=1, max_length=256)
    model: str | None = None
    prompt: str | None = None  # completions: raw text, tokenized as is
    messages: list[ChatMessageIn] | None = None  # chat: rendered with the model's chat template
    prompt_token_ids: list[int] | None = None  # already tokenized (resume, or a client sending ids)
    resume_token_ids: list[int] = Field(default_factory=list)  # generated earlier on another replica
    # characters of generated text already delivered for resume_token_ids (None: the ids are plain context)
    resume_text_chars: int | None = Field(default=None, ge=0)
    add_generation_prompt: bool = True
    max_tokens: int | None = Field(default=None, ge=1)  # None: up to the model's context
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=MAX_TOKEN_ID)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)], Annotated[float, Field(ge=-100, le=100)]] = Field(
        default_factory=dict, max_length=MAX_LOGIT_BIAS
    )
    stop: list[Annotated[str, Field(max_length=4096)]] = Field(default_factory=list, max_length=64)
    stop_token_ids: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] = Field(default_factory=list, max_length=1024)
    ignore_eos: bool = False
    echo: bool = False  # completions: prepend the prompt text to the output
    json_schema: dict[str, Any] | None = None  # the output is JSON valid against it
    json_schema_strict: bool = False  # OpenAI's strict mode: objects take no property their schema does not declare
    tools: list[ToolFunction] = Field(default_factory=list, max_length=128)
    tool_choice: Literal["none", "auto", "required"] = "none"
    tool_name: str | None = None  # with tool_choice "required": the function that must be called
    parallel_tool_calls: bool = True
    # per tool call already announced to the client: characters of its arguments delivered (resume)
    resume_tool_chars: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=1024)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # None: off; k: with k alternatives
    chat_template_kwargs: TemplateKwargs = Field(default_factory=dict)  # messages only
    split_reasoning: bool = False  # a chat answer: reasoning apart from the answer, when the worker has a parser
    resume_reasoning_chars: int = Field(default=0, ge=0)  # characters of reasoning already delivered (resume)

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        given = [f for f in ("prompt", "messages", "prompt_token_ids") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError("exactly one of prompt, messages, prompt_token_ids must be given")
        return self


class ToolCallChunk(BaseModel):
    """A piece of a tool call parsed from the output: the first for an `index` has `id` and `name`, the rest add
    fragments of the arguments' JSON text."""

    index: int = Field(ge=0)
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class LogprobAlternative(BaseModel):
    """One token at a position and its log probability (the raw distribution's log-softmax)."""

    token: str  # the token's text; bytes that are not whole UTF-8 characters as `\xNN` escapes
    logprob: float | None  # None only for the first token of an echoed prompt (nothing predicts it)
    bytes: list[int]  # the token's own UTF-8 bytes


class TokenLogprob(LogprobAlternative):
    """A token of the output (or of an echoed prompt) and the most likely tokens at its position."""

    top: list[LogprobAlternative] = Field(default_factory=list, max_length=MAX_LOGPROBS)


class GenerateChunk(BaseModel):
    """One line of the worker's NDJSON stream. The last chunk has `finish_reason` (or `error`) set."""

    request_id: str
    text: str = ""  # text delta (may be empty while UTF-8 or a possible stop string is held back)
    reasoning: str = ""  # reasoning delta (split_reasoning), never in `text`
    tool_calls: list[ToolCallChunk] = Field(default_factory=list)  # never raw text of a call in `text`
    token_ids: list[int] = Field(default_factory=list)  # ids generated since the previous chunk
    finish_reason: FinishReason | None = None
    stop_string: str | None = None  # with finish_reason "stop": the stop string (of `stop`) that ended the output
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated so far, resume_token_ids included
    reasoning_tokens: int = 0  # of those, the reasoning's (its tags included)
    error: ErrorInfo | None = None
    prompt_token_ids: list[int] | None = None  # the prompt as the worker tokenized it: first chunk only
    cached_tokens: int = 0  # prompt tokens the worker served from its prefix cache (not computed): first chunk only
    logprobs: list[TokenLogprob] | None = None  # when asked for: one per id of token_ids (echo: per prompt token)

    def to_line(self) -> bytes:
        return self.model_dump_json(exclude_defaults=False).encode() + b"\n"


MAX_EMBED_INPUTS = 2048  # inputs in one embeddings request, as OpenAI


class EmbedRequest(BaseModel):
    """`POST /worker/embed`: a vector per input; a text is tokenized by the worker, token ids are used as given."""

    request_id: str = Field(min_length=1, max_length=256)
    model: str | None = None
    input: list[str | list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]]] = Field(
        min_length=1, max_length=MAX_EMBED_INPUTS
    )
    dimensions: int | None = Field(default=None, ge=1, le=MAX_REPORTED)  # truncate (Matryoshka), then renormalize


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]  # one per input, in order
    prompt_tokens: int


MAX_SCORE_PAIRS = 2048  # pairs in one rerank or score request


class ScorePairsRequest(BaseModel):
    """`POST /worker/score`: a score for each pair (`text_1[i]`, `text_2[i]`); a single `text_1` is paired with
    every `text_2`."""

    request_id: str = Field(min_length=1, max_length=256)
    model: str | None = None
    text_1: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, max_length=MAX_SCORE_PAIRS)
    text_2: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, max_length=MAX_SCORE_PAIRS)

    @model_validator(mode="after")
    def _pairs(self) -> ScorePairsRequest:
        if len(self.text_1) not in (1, len(self.text_2)):
            raise ValueError("text_1 must hold one text, or as many as text_2")
        return self

    def pairs(self) -> list[tuple[str, str]]:
        firsts = self.text_1 * len(self.text_2) if len(self.text_1) == 1 else self.text_1
        return list(zip(firsts, self.text_2, strict=True))


class ScorePairsResponse(BaseModel):
    scores: list[float]  # one per pair, in order
    prompt_tokens: int  # the tokens the model read (a cross-encoder: each pair's; an embedding model: each text's)


class TokenizeRequest(BaseModel):
    """`POST /worker/tokenize`: exactly one of `prompt` (tokenized as a document) and `messages` (through the chat
    template, with the `tools` offered, as a generation renders them)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = Field(default=None, min_length=1)
    tools: list[ToolFunction] = Field(default_factory=list, max_length=128)  # messages only
    add_special_tokens: bool = True  # prompt only
    add_generation_prompt: bool = True  # messages only

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of prompt, messages must be given")
        return self


class TokenizeResponse(BaseModel):
    tokens: list[int]
    max_model_len: int


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] = Field(max_length=1 << 24)


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelActionRequest(BaseModel):
    """`POST /worker/models/load`, `/worker/models/unload`, `/worker/models/pin` on a multi-model worker (answered
    with the model's `ModelState`); `pinned` is read by `pin` only (false: unpin)."""

    model: ModelName
    pinned: bool = True
