"""The public OpenAI wire format: request and response models for /v1/chat/completions, /v1/completions and
/v1/models. Data only (pydantic, no I/O).

Owns: parsing a client's request once, at the edge. Every limit is a `Field()` constraint, so a bad value is a
400 that names the parameter; features lmfleet does not have (best_of, suffix, audio, the deprecated `functions`)
are rejected by name rather than silently ignored; fields OpenAI tools send
that change nothing about the output (`user`, `metadata`, `store`, ...) are ignored. A JSON `null` for a knob
means its default, as with OpenAI. Each request model carries its own translation to the worker's
`GenerateRequest`, one per choice, beside the fields it reads (a chat request asks the worker to split a model's
reasoning from its answer; `reasoning_effort` and `chat_template_kwargs` become chat template variables).

Does not own: model resolution, worker choice, streaming (lmfleet.api), or the error JSON (lmfleet.errors).

Choices: a request asks for `num_choices` generations. Chat: `n` of one conversation. Completions: `n` for each
prompt, prompt-major (choice `i` is prompt `i // n`), as OpenAI orders them. With a `seed`, the `j`-th choice
for a prompt uses `seed + j`, so the choices differ and each is reproducible on its own.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

from lmfleet.protocol.worker import MAX_TOKEN_ID, ChatMessageIn, GenerateRequest, KeepAlive, TemplateKwargs
from lmfleet.protocol.worker import SEED_MAX as WORKER_SEED_MAX

MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # choices per request (completions: prompts x n)
MAX_PROMPTS = 64  # prompts in one completions request
MAX_MESSAGES = 2048
MAX_STOP = 4  # stop sequences, as OpenAI
MAX_STOP_CHARS = 256
MAX_TOKENS = 1 << 20  # the worker enforces the model's real context length
MAX_NAME_CHARS = 256  # model names, message names, `user`
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to "what fits"
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs, as OpenAI
MAX_LOGIT_BIAS = 300  # entries, as OpenAI

FinishReason = Literal["stop", "length", "tool_calls"]
# OpenAI's `reasoning_effort` values; lmfleet hands the value to the chat template as `reasoning_effort`.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


def _error(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


# ---------------------------------------------------------------------------------------------------------------
# Field shapes that accept several JSON forms and normalize them (the union errors pydantic would give are
# unreadable, so each form is checked here with one clear message).


def _stop_list(value: Any) -> Any:
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, str):
        return [value]
    raise _error("stop_type", f"must be a string or a list of up to {MAX_STOP} strings")


StopStrings = Annotated[
    Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)] | None,
    BeforeValidator(_stop_list),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                {"type": "array", "maxItems": MAX_STOP, "items": {"type": "string", "maxLength": MAX_STOP_CHARS}},
                {"type": "null"},
            ],
            "description": f"Up to {MAX_STOP} sequences where generation stops; not included in the output.",
        }
    ),
]


def _content_text(value: Any) -> Any:
    """A message's content: a string, or a list of text parts (joined with newlines). Other parts are refused."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _error("content_type", "must be a string or a list of {'type': 'text', 'text': ...} parts")
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise _error(
                "unsupported_content_part",
                f"part {i} has type {kind!r}; only 'text' content parts are supported",
            )
        if not isinstance(part.get("text"), str):
            raise _error("content_type", f"part {i}: 'text' must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


MessageContent = Annotated[
    str | None,
    BeforeValidator(_content_text),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                        "required": ["type", "text"],
                    },
                },
                {"type": "null"},
            ],
            "description": "A string, or a list of text parts (joined with newlines). Image and audio parts are "
            "not supported.",
        }
    ),
]


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def _prompt_list(value: Any) -> Any:
    """`prompt` in any of OpenAI's four forms, as a list of prompts, each a string or a list of token ids."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return value
        if _is_token_ids(value):
            return [value]
        if all(_is_token_ids(p) and p for p in value):
            return value
    raise _error(
        "prompt_type",
        "must be a string, a non-empty list of strings, a list of token ids (integers >= 0), "
        "or a list of non-empty lists of token ids",
    )


Prompts = Annotated[
    list[str | list[int]],
    BeforeValidator(_prompt_list),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "maxItems": MAX_PROMPTS},
                {"type": "array", "items": {"type": "integer", "minimum": 0}},
                {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
            ],
            "description": "A string, a list of strings (each its own group of `n` choices), a list of token "
            "ids, or a list of token-id lists.",
        }
    ),
]


def _logit_bias(value: Any) -> Any:
    """OpenAI's `logit_bias`: token ids as string keys, each bias in [-100, 100]; here keyed by int ids."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _error("logit_bias_type", "must be an object mapping token ids (as strings) to biases")
    if len(value) > MAX_LOGIT_BIAS:
        raise _error("too_many_logit_biases", f"at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
    out: dict[int, float] = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) <= MAX_TOKEN_ID):
            raise _error("logit_bias_key", f"keys must be token ids (non-negative integers as strings), got {key!r}")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise _error("logit_bias_value", f"the bias for token {key} must be a number in [-100, 100]")
        out[int(key)] = float(bias)
    return out


LogitBias = Annotated[
    dict[int, float] | None,
    BeforeValidator(_logit_bias),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
                {"type": "null"},
            ],
            "description": "Token id (as a string) -> bias in [-100, 100] added to its logit before sampling.",
        }
    ),
]

# Parameters lmfleet does not support yet: the values that are fine (absent, or saying "off") and what we say
# otherwise. The 400 names the parameter, so a client learns at once instead of getting a quietly wrong answer.
_NOT_YET: dict[str, tuple[Any, str]] = {
    "functions": (lambda v: not v, "the deprecated `functions` are not supported; use `tools`"),
    "function_call": (
        lambda v: v is None or v == "none",
        "the deprecated `function_call` is not supported; use `tool_choice`",
    ),
    "modalities": (lambda v: v is None or set(v) <= {"text"}, "only the 'text' modality is supported"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported"),
    "best_of": (lambda v: v is None or v == 1, "best_of > 1 is not supported yet"),
    "suffix": (lambda v: not v, "suffix (insertion) is not supported"),
}


def _reject_unsupported(cls: type, value: Any, info: ValidationInfo) -> Any:
    """Field validator shared by the request models (pydantic passes the class first)."""
    assert info.field_name is not None
    fine, why = _NOT_YET[info.field_name]
    if not fine(value):
        raise _error("unsupported_parameter", why)
    return value


# ---------------------------------------------------------------------------------------------------------------
# Requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, strict=True, description="Send a last chunk with `usage` and empty `choices`.")


class _GenerationRequest(BaseModel):
    """The sampling knobs chat and completions share, and their translation to the worker's fields."""

    # NaN and Infinity (which Python's JSON parser accepts) are refused by every float field, naming it.
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)

    model: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_NAME_CHARS,
        description="May be omitted when the server serves exactly one model or has a default model.",
    )
    n: int = Field(1, ge=1, le=MAX_N, strict=True, description="Choices to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, strict=True, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, strict=True)
    top_k: int = Field(0, ge=-1, le=1_000_000, strict=True, description="vLLM extension: 0 or -1 means off.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, strict=True)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, strict=True)
    stop: StopStrings = None
    seed: int | None = Field(
        None, ge=SEED_MIN, le=SEED_MAX, strict=True, description="Choice j of a prompt uses seed + j."
    )
    ignore_eos: bool = Field(False, strict=True, description="vLLM extension: keep generating past end-of-sequence.")
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = Field(None, description="Only with `stream: true`.")
    user: str | None = Field(None, max_length=MAX_NAME_CHARS, description="Accepted; not used.")
    min_p: float = Field(
        0.0, ge=0.0, le=1.0, strict=True, description="vLLM extension: drop tokens below min_p x the top probability."
    )
    logit_bias: LogitBias = None
    keep_alive: KeepAlive = Field(
        None,
        description="Ollama extension: how long the model stays loaded after this request on a worker that loads "
        "models on demand: seconds or a duration ('5m', '1h'); negative: forever; 0: unload once idle.",
    )

    @field_validator(
        "n",
        "temperature",
        "top_p",
        "top_k",
        "presence_penalty",
        "frequency_penalty",
        "min_p",
        "ignore_eos",
        "stream",
        mode="before",
    )
    @classmethod
    def _null_means_default(cls, value: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise _error("stream_options_without_stream", "is only allowed when stream is true")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling(self, choice_in_prompt: int) -> dict[str, Any]:
        """GenerateRequest fields for the `choice_in_prompt`-th choice of a prompt."""
        seed = None
        if self.seed is not None:  # OpenAI's seeds are signed 64-bit; the worker's unsigned: wrap around
            seed = (self.seed + choice_in_prompt) % (WORKER_SEED_MAX + 1)
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": max(self.top_k, 0),
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "min_p": self.min_p,
            "logit_bias": self.logit_bias or {},
            "stop": list(self.stop or []),
            "seed": seed,
            "ignore_eos": self.ignore_eos,
        }


# ---------------------------------------------------------------------------------------------------------------
# Structured outputs and tools (the worker compiles the grammars; here only their shapes)

FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: FunctionName
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="None: any JSON object.")
    strict: bool | None = Field(
        None,
        description="The schema is always enforced; strict also closes its objects: a property the schema does not "
        "declare is allowed only where it says so (`additionalProperties`).",
    )


class ResponseFormat(BaseModel):
    """`text`, `json_object` (JSON mode: some JSON object) or `json_schema` (JSON valid against the schema), enforced
    by constrained decoding in the worker."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = Field(None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _schema_given(cls, value: JsonSchemaSpec | None, info: ValidationInfo) -> JsonSchemaSpec | None:
        if value is None and info.data.get("type") == "json_schema":
            raise _error("missing_json_schema", "is required when type is 'json_schema'")
        return value

    @property
    def strict(self) -> bool:
        """`json_schema.strict`: objects take only the properties their schemas declare, unless they say otherwise."""
        return self.json_schema is not None and self.json_schema.strict is True

    def output_schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must follow; None for plain text."""
        if self.type == "text":
            return None
        if self.type == "json_schema" and self.json_schema is not None and self.json_schema.schema_ is not None:
            return self.json_schema.schema_
        return {"type": "object"}


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema; None: no parameters.")
    strict: bool | None = Field(
        None,
        description="Accepted; forced calls always follow the schema, as strict: no property it does not declare "
        "unless it says otherwise (`additionalProperties`).",
    )


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionSpec


class FunctionRef(BaseModel):
    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionRef


class FunctionCall(BaseModel):
    name: FunctionName
    arguments: str = Field(description="The arguments as a JSON string.")


class ToolCall(BaseModel):
    """A tool call in an assistant message (sent back by clients in the conversation, and in our answers)."""

    id: str = Field(max_length=MAX_NAME_CHARS)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: MessageContent = Field(None, validate_default=True)
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)
    tool_call_id: str | None = Field(None, max_length=MAX_NAME_CHARS, validate_default=True)
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_CHOICES, description="Assistant messages only.")
    reasoning_content: str | None = Field(
        None,
        validation_alias=AliasChoices("reasoning_content", "reasoning"),
        description="Assistant messages only: the reasoning of an earlier answer, for chat templates that show it "
        "(Qwen3 keeps it after the last user message); also accepted as `reasoning`.",
    )

    @field_validator("content")
    @classmethod
    def _content_required(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("role", "assistant") != "assistant":
            raise _error("missing_content", "is required for every role but 'assistant'")
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _tool_call_id_for_tools(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("role") == "tool":
            raise _error("missing_tool_call_id", "is required for 'tool' messages")
        return value

    def to_worker(self) -> ChatMessageIn:
        # Chat templates know "system"; OpenAI's "developer" role means the same thing to a model that has no
        # separate developer channel.
        role = "system" if self.role == "developer" else self.role
        extra: dict[str, Any] = {
            k: v for k, v in (("name", self.name), ("tool_call_id", self.tool_call_id)) if v is not None
        }
        if self.tool_calls:
            extra["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.reasoning_content is not None and self.role == "assistant":
            extra["reasoning_content"] = self.reasoning_content
        return ChatMessageIn(role=role, content=self.content, **extra)


class ChatCompletionRequest(_GenerationRequest):
    """`POST /v1/chat/completions` (and FastChat's `POST /`)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "my-model",
                    "messages": [
                        {"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": "What is deep learning?"},
                    ],
                    "max_tokens": 100,
                }
            ]
        }
    )

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_TOKENS,
        strict=True,
        description="Deprecated by OpenAI in favour of max_completion_tokens; default: as many as fit in the context.",
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, strict=True, description="Wins over max_tokens."
    )
    logprobs: bool | None = Field(None, strict=True, description="Return each output token's log probability.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, strict=True, description="With logprobs: the most likely tokens per position."
    )
    tools: list[ToolSpec] | None = Field(None, max_length=128, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description="Default 'auto' with tools, else 'none'. 'required' and a named function are enforced by a "
        "grammar; with 'auto' the model answers in text or calls a tool.",
    )
    parallel_tool_calls: bool | None = Field(None, description="Default true: a forced call may be several calls.")
    functions: list[dict[str, Any]] | None = Field(None, description="Deprecated; not supported.")
    function_call: str | dict[str, Any] | None = Field(None, description="Deprecated; only 'none'.")
    response_format: ResponseFormat | None = Field(
        None, description="JSON mode and structured outputs, enforced by constrained decoding."
    )
    modalities: list[str] | None = Field(None, description="Only ['text'].")
    audio: dict[str, Any] | None = Field(None, description="Not supported.")
    prediction: dict[str, Any] | None = Field(None, description="Not supported.")
    reasoning_effort: ReasoningEffort | None = Field(
        None, description="Passed to the chat template as `reasoning_effort` (templates that read it)."
    )
    chat_template_kwargs: TemplateKwargs | None = Field(
        None,
        description='vLLM extension: more variables for the chat template, e.g. {"enable_thinking": false} for '
        "Qwen3 (no reasoning). Names the template's renderer sets itself (messages, tools, add_generation_prompt, "
        "bos_token, ...) are refused.",
    )

    check_supported = field_validator(
        "functions",
        "function_call",
        "modalities",
        "audio",
        "prediction",
    )(_reject_unsupported)

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, value: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools") or []
        if value in (None, "none", "auto"):  # "auto" without tools: nothing to call, as "none"
            return value
        if not tools:
            raise _error("tool_choice_without_tools", "is only allowed when tools are given")
        if isinstance(value, NamedToolChoice) and value.function.name not in {t.function.name for t in tools}:
            raise _error("unknown_tool", f"names {value.function.name!r}, which is not among the tools")
        return value

    @field_validator("response_format")
    @classmethod
    def _one_grammar(cls, value: ResponseFormat | None, info: ValidationInfo) -> ResponseFormat | None:
        choice = info.data.get("tool_choice")
        if value is not None and value.type != "text" and (choice == "required" or isinstance(choice, NamedToolChoice)):
            raise _error("format_with_forced_tool", "cannot be JSON when tool_choice forces a tool call")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise _error("top_logprobs_without_logprobs", "requires logprobs: true")
        return value

    @property
    def num_choices(self) -> int:
        return self.n

    def prompt_index(self, choice: int) -> int:
        return 0

    def _tooling(self) -> dict[str, Any]:
        """GenerateRequest fields for structured output and tools."""
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if self.tools else "none")
        return {
            "json_schema": self.response_format.output_schema() if self.response_format else None,
            "json_schema_strict": self.response_format is not None and self.response_format.strict,
            "tools": [t.function.model_dump(exclude_none=True) for t in self.tools or []],
            "tool_choice": "required" if isinstance(choice, NamedToolChoice) else choice,
            "tool_name": choice.function.name if isinstance(choice, NamedToolChoice) else None,
            "parallel_tool_calls": self.parallel_tool_calls is not False,
        }

    def to_generate_request(self, request_id: str, model: str, *, choice: int = 0) -> GenerateRequest:
        """The worker request for choice `choice` (0 <= choice < num_choices)."""
        return GenerateRequest(
            request_id=request_id,
            model=model,
            messages=[m.to_worker() for m in self.messages],
            max_tokens=self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            chat_template_kwargs=self._template_kwargs(),
            split_reasoning=True,
            keep_alive=self.keep_alive,
            **self._sampling(choice),
            **self._tooling(),
        )

    def _template_kwargs(self) -> dict[str, Any]:
        """The chat template's extra variables: `reasoning_effort`, then `chat_template_kwargs` (which win)."""
        effort = {"reasoning_effort": self.reasoning_effort} if self.reasoning_effort is not None else {}
        return {**effort, **(self.chat_template_kwargs or {})}


class CompletionRequest(_GenerationRequest):
    """`POST /v1/completions` (legacy text completions)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "my-model", "prompt": "Once upon a time", "max_tokens": 32}]}
    )

    prompt: Prompts
    max_tokens: int = Field(COMPLETION_DEFAULT_MAX_TOKENS, ge=1, le=MAX_TOKENS, strict=True)
    echo: bool = Field(False, strict=True, description="Start each choice's text with its prompt.")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_COMPLETION_LOGPROBS,
        strict=True,
        description="Return each token's log probability and this many most likely tokens per position (with "
        "echo, the prompt's too).",
    )
    best_of: int | None = Field(None, description="Only 1.")
    suffix: str | None = Field(None, description="Not supported (only empty).")

    check_supported = field_validator("best_of", "suffix")(_reject_unsupported)

    @field_validator("max_tokens", "echo", mode="before")
    @classmethod
    def _null_means_default_too(cls, value: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("prompt")
    @classmethod
    def _bounded_choices(cls, value: list[str | list[int]], info: ValidationInfo) -> list[str | list[int]]:
        n = info.data.get("n", 1)
        if len(value) > MAX_PROMPTS:
            raise _error("too_many_prompts", f"at most {MAX_PROMPTS} prompts per request, got {len(value)}")
        if len(value) * n > MAX_CHOICES:
            raise _error(
                "too_many_choices",
                f"{len(value)} prompts x n={n} asks for {len(value) * n} choices; at most {MAX_CHOICES} per request",
            )
        return value

    @property
    def num_choices(self) -> int:
        return len(self.prompt) * self.n

    def prompt_index(self, choice: int) -> int:
        return choice // self.n

    def to_generate_request(self, request_id: str, model: str, *, choice: int = 0) -> GenerateRequest:
        """The worker request for choice `choice` (0 <= choice < num_choices): prompt `choice // n`."""
        prompt = self.prompt[self.prompt_index(choice)]
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        return GenerateRequest(
            request_id=request_id,
            model=model,
            prompt=text,
            prompt_token_ids=ids,
            max_tokens=self.max_tokens,
            echo=self.echo,
            logprobs=self.logprobs,
            keep_alive=self.keep_alive,
            **self._sampling(choice % self.n),
        )


# ---------------------------------------------------------------------------------------------------------------
# Responses (field names and shapes as in the `openai` package's types)


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0  # of the completion tokens, those of the reasoning (its tags included)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # of the prompt tokens, those served from a worker's prefix cache (not computed)


class Usage(BaseModel):
    """An answer's usage, the one every endpoint spells its own from (Responses: `input_tokens_details`, Messages:
    `cache_read_input_tokens`); what it counts is lmfleet.api.upstream's `usage_of`."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    # only when an answer reasoned (a chat answer of a model with a reasoning parser)
    completion_tokens_details: CompletionTokensDetails | None = Field(default=None, exclude_if=lambda d: d is None)


def _absent(value: Any) -> bool:
    return value is None


class AssistantMessage(BaseModel):
    """The reasoning, when the model reasoned, is in `reasoning_content` (vLLM's name, SGLang's, llama.cpp's,
    DeepSeek's API) and in `reasoning` (the name newer vLLM and OpenRouter use): the same text, so clients of either
    read it."""

    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the answer is only tool calls
    refusal: None = None  # OpenAI requires the field; lmfleet's models never refuse by a separate channel
    tool_calls: list[ToolCall] | None = Field(default=None, exclude_if=lambda calls: not calls)
    reasoning_content: str | None = Field(default=None, exclude_if=_absent)
    reasoning: str | None = Field(default=None, exclude_if=_absent)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """The legacy shape: parallel lists. With echo, the prompt's first token has a null logprob and top_logprobs
    entry (as OpenAI's API sends; its published schema types these entries as numbers and objects only)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = Field(default=None, exclude_if=lambda v: v is None)  # first delta of a call only
    arguments: str = ""  # the next fragment of the arguments' JSON


class ToolCallDelta(BaseModel):
    """A piece of a streamed tool call: the first for each `index` has `id`, `type` and the function's name, later
    ones add fragments of the arguments."""

    index: int
    id: str | None = Field(default=None, exclude_if=lambda v: v is None)
    type: Literal["function"] | None = Field(default=None, exclude_if=lambda v: v is None)
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    # Only in the first chunk of each choice, and absent (not null) after it, as OpenAI's schema has it.
    role: Literal["assistant"] | None = Field(default=None, exclude_if=lambda role: role is None)
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = Field(default=None, exclude_if=lambda calls: not calls)
    # the next piece of the reasoning, under both names as in AssistantMessage; absent when none
    reasoning_content: str | None = Field(default=None, exclude_if=_absent)
    reasoning: str | None = Field(default=None, exclude_if=_absent)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]  # empty in the final usage chunk
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionChunk(BaseModel):
    """A streamed completions event: the same `object` as a `Completion`, as OpenAI sends it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]  # empty in the final usage chunk
    # Only in the final usage chunk: the completions schema has no null usage (the chat chunk's does).
    usage: Usage | None = Field(default=None, exclude_if=lambda usage: usage is None)


class ModelStatus(BaseModel):
    """Where a model stands in the fleet, as llama-server's router reports it in its model list: `loaded` when some
    worker holds it, else `loading`, else `unloaded` (`failed`: its last load failed)."""

    value: Literal["loaded", "loading", "unloaded"]
    failed: bool = Field(default=False, exclude_if=lambda failed: not failed)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmfleet"
    max_model_len: int | None = None  # vLLM's field: the context length its workers report
    status: ModelStatus | None = None  # llama-server's router's field


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
