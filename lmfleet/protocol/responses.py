"""The public wire format of OpenAI's Responses API (`/v1/responses`). Data only (pydantic, no I/O).

Owns:
  * parsing a `CreateResponseRequest` once, at the edge: `input` as a string or a list of items (messages with
    string or text content parts, `function_call`, `function_call_output` and `reasoning` items), the sampling
    knobs, `text.format`, function `tools` and `tool_choice`, `reasoning.effort` and `chat_template_kwargs` (for
    the chat template); every parameter lmfleet cannot honour (built-in tools, `background`, `reasoning.mode`,
    image or file inputs, ...) is a 400 naming it, never silently ignored. Hints that change nothing about the
    output (`user`, `prompt_cache_key`, `safety_identifier`, `stream_options`, `reasoning.summary`: no summary is
    made) are accepted and ignored;
  * the translation of a request, after the items of the response it continues, into the body of the chat
    completions request lmfleet generates it with (`chat_body`): a Responses request IS a chat request
    underneath, so the chat path's checks, failover and resume apply unchanged, and so do its refusals (a
    feature the chat path lacks is the chat path's 400). `CHAT_PARAMS` maps the chat request's parameter names
    back to the Responses names, for those 400s;
  * the objects a response is made of (`Response`, `ReasoningOutput`, `OutputMessage`, `FunctionCall`,
    `ResponseUsage`), the typed stream events, the stored input items as `GET /v1/responses/{id}/input_items`
    lists them (`resource`).

Does not own: turning chat answers into responses and events (lmfleet.api.responses), storage
(lmfleet.api.response_store), the error JSON (lmfleet.errors).

Conversation state: instructions are not carried from one response to the next (as with OpenAI); the input items
and output items of a stored response are, in order, before the new input.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from lmfleet.protocol.openai import MAX_MESSAGES, MAX_NAME_CHARS, MAX_TOKENS, ReasoningEffort, Usage
from lmfleet.protocol.worker import TemplateKwargs

MAX_METADATA_KEYS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512  # OpenAI's limits
MAX_ID_CHARS = 256


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _error(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


# ---------------------------------------------------------------------------------------------------------------
# Input items


Role = Literal["user", "system", "developer", "assistant"]


class TextPart(BaseModel):
    """A text content part. A message's parts all take its role's type: `output_text` for the assistant (what the
    model said), `input_text` for every other role."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["input_text", "output_text"]
    text: str


def _text_parts(value: Any, info: ValidationInfo) -> Any:
    """A string, or a list of text parts, as parts of the type the role takes. Other parts are refused."""
    kind = "output_text" if info.data.get("role") == "assistant" else "input_text"
    if isinstance(value, str):
        return [{"type": kind, "text": value}]
    if not isinstance(value, list):
        raise _error("content_type", "must be a string or a list of input_text / output_text parts")
    parts = []
    for i, part in enumerate(value):
        given = part.get("type") if isinstance(part, dict) else None
        if given not in ("input_text", "output_text"):
            raise _error(
                "unsupported_content_part",
                f"part {i} has type {given!r}; only 'input_text' and 'output_text' parts are supported",
            )
        parts.append({**part, "type": kind})
    return parts


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    id: str | None = Field(None, max_length=MAX_ID_CHARS)
    role: Role
    content: Annotated[list[TextPart], BeforeValidator(_text_parts)]

    def chat_message(self) -> dict[str, Any]:
        return {"role": self.role, "content": [{"type": "text", "text": p.text} for p in self.content]}

    def resource(self) -> dict[str, Any]:
        """As OpenAI lists it: an assistant message is an output message, the others input messages."""
        parts: list[dict[str, Any]] = [p.model_dump() for p in self.content]
        if self.role == "assistant":
            parts = [{**p, "annotations": [], "logprobs": []} for p in parts]
        return {"id": self.id, "type": "message", "role": self.role, "content": parts, "status": "completed"}


class FunctionCallItem(BaseModel):
    """A call the model made (from an earlier response's output, or replayed by the client)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call"]
    id: str | None = Field(None, max_length=MAX_ID_CHARS)
    call_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    arguments: str

    def chat_tool_call(self) -> dict[str, Any]:
        return {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def resource(self) -> dict[str, Any]:
        return {**self.model_dump(), "status": "completed"}


class FunctionCallOutputItem(BaseModel):
    """What the client's function returned for a call."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call_output"]
    id: str | None = Field(None, max_length=MAX_ID_CHARS)
    call_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    output: str | list[TextPart]

    @field_validator("output", mode="before")
    @classmethod
    def _text_output(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, part in enumerate(value):
                if not (isinstance(part, dict) and part.get("type") == "input_text"):
                    raise _error("unsupported_content_part", f"part {i}: only 'input_text' output parts are supported")
        return value

    def chat_message(self) -> dict[str, Any]:
        text = self.output if isinstance(self.output, str) else [{"type": "text", "text": p.text} for p in self.output]
        return {"role": "tool", "tool_call_id": self.call_id, "content": text}

    def resource(self) -> dict[str, Any]:
        return {**self.model_dump(), "status": "completed"}


class SummaryText(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["summary_text"] = "summary_text"
    text: str


class ReasoningText(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["reasoning_text"] = "reasoning_text"
    text: str = ""


class ReasoningInputItem(BaseModel):
    """The model's reasoning before an answer (from an earlier response's output, or replayed by the client): it
    goes to the chat template with the assistant message after it (`reasoning_content`); `encrypted_content` is
    never made here and is ignored."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["reasoning"]
    id: str | None = Field(None, max_length=MAX_ID_CHARS)
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None

    @property
    def text(self) -> str:
        parts = self.content if self.content else self.summary
        return "".join(p.text for p in parts)

    def resource(self) -> dict[str, Any]:
        return {**self.model_dump(exclude_none=True), "status": "completed"}


_ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


def _known_item(value: Any) -> Any:
    """An item's `type` may be left out for a message (OpenAI's "easy" input message); others are refused."""
    if not isinstance(value, dict):
        raise _error("item_type", "every input item must be an object")
    kind = value.get("type", "message" if "role" in value else None)
    if kind not in _ITEM_TYPES:
        raise _error(
            "unsupported_input_item",
            f"input items of type {kind!r} are not supported; lmfleet takes {', '.join(_ITEM_TYPES)} items",
        )
    return {**value, "type": kind}


def _untagged(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Errors inside an item name its place (`input.0.content`), not also the item's type (`input.0.message...`),
    which pydantic adds for a tagged union."""
    try:
        return handler(value)
    except ValidationError as exc:
        details = [
            InitErrorDetails(
                type=PydanticCustomError(e["type"], e["msg"]),
                loc=tuple(p for i, p in enumerate(e["loc"]) if not (i == 1 and p in _ITEM_TYPES)),
                input=e["input"],
            )
            for e in exc.errors()
        ]
        raise ValidationError.from_exception_data(exc.title, details) from None


InputItem = Annotated[
    MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningInputItem,
    Field(discriminator="type"),
    BeforeValidator(_known_item),
]
InputItems = Annotated[list[InputItem], WrapValidator(_untagged)]
INPUT_ITEMS: TypeAdapter[list[InputItem]] = TypeAdapter(InputItems)


def _input_list(value: Any) -> Any:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if isinstance(value, list):
        return value
    raise _error("input_type", "must be a string or a list of input items")


def with_ids(items: Sequence[InputItem]) -> list[InputItem]:
    """The items, each with an `id` (kept when the client gave one), as they are stored and listed."""
    prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
    return [item if item.id else item.model_copy(update={"id": new_id(prefix[item.type])}) for item in items]


def chat_messages(items: Sequence[InputItem]) -> list[dict[str, Any]]:
    """Input items as chat messages: a function call joins the assistant message just before it (or starts one);
    its output is a `tool` message; reasoning goes with the assistant message it precedes (a message or calls),
    and is dropped when none follows."""
    messages: list[dict[str, Any]] = []
    thought: str | None = None  # reasoning waiting for its assistant message
    for item in items:
        if isinstance(item, ReasoningInputItem):
            thought = item.text
            continue
        if isinstance(item, FunctionCallItem):
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant" or thought is not None:
                last = {"role": "assistant", "content": None}
                messages.append(last)
            last.setdefault("tool_calls", []).append(item.chat_tool_call())
        else:
            messages.append(item.chat_message())
        if thought is not None and messages[-1]["role"] == "assistant":
            messages[-1]["reasoning_content"] = thought
        thought = None
    return messages


# ---------------------------------------------------------------------------------------------------------------
# Tools and output formats


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def chat_tool(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "description": self.description, "parameters": self.parameters}
        function["strict"] = self.strict
        return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


def _function_tool(value: Any) -> Any:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind != "function":
        raise _error("unsupported_tool", f"tools of type {kind!r} are not supported; only 'function' tools are")
    return value


def _tool_choice(value: Any) -> Any:
    if value is None or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return {"type": "function", "name": value["name"]}
    raise _error(
        "unsupported_tool_choice",
        "only 'none', 'auto', 'required' or {'type': 'function', 'name': ...} are supported",
    )


class TextFormat(BaseModel):
    """`text.format`: plain text, a JSON schema, or JSON mode."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["text", "json_schema", "json_object"]
    name: str | None = Field(None, min_length=1, max_length=64)
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_needs_name(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.json_schema is None):
            raise ValueError("a json_schema format needs 'name' and 'schema'")
        return self

    def chat_response_format(self) -> dict[str, Any] | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        spec = {"name": self.name, "schema": self.json_schema, "description": self.description, "strict": self.strict}
        return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}


class TextParam(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = Field(None, description="Only 'medium' (the model's own).")


# ---------------------------------------------------------------------------------------------------------------
# The request

# Parameters lmfleet cannot honour: the values that are fine (absent, or saying "off") and what the 400 says.
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "background": (lambda v: not v, "background responses are not supported"),
    "include": (lambda v: not v, "no additional output data can be included"),
    "conversation": (lambda v: v is None, "conversations are not supported; use previous_response_id"),
    "prompt": (lambda v: v is None, "stored prompt templates are not supported"),
    "truncation": (lambda v: v in (None, "disabled"), "only 'disabled' is supported: an input too long is a 400"),
    "max_tool_calls": (lambda v: v is None, "built-in tools are not supported, so max_tool_calls does not apply"),
    "top_logprobs": (lambda v: not v, "log probabilities are not supported yet"),
    "context_management": (lambda v: v is None, "context management is not supported"),
    "moderation": (lambda v: v is None, "moderation is not supported"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "only 'auto' and 'default' are supported"),
}

# Chat request parameters (lmfleet.protocol.openai) by their name in a Responses request, for the chat path's 400s.
CHAT_PARAMS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
}


class ReasoningParam(BaseModel):
    """`reasoning`: `effort` goes to the chat template (as chat's `reasoning_effort`); a summary may be asked for
    but none is made (the reasoning item carries the reasoning itself, in `content`)."""

    model_config = ConfigDict(extra="ignore")

    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = Field(None, description="Accepted; no summary is made.")
    generate_summary: Literal["auto", "concise", "detailed"] | None = Field(None, description="Deprecated summary.")
    mode: Any = Field(None, description="Not supported.")
    context: Any = Field(None, description="Not supported.")

    @field_validator("mode", "context")
    @classmethod
    def _not_supported(cls, value: Any) -> Any:
        if value is not None:
            raise _error("unsupported_parameter", "is not supported")
        return value

    def echoed(self) -> dict[str, Any]:
        return {"effort": self.effort, "summary": self.summary or self.generate_summary}


class CreateResponseRequest(BaseModel):
    """`POST /v1/responses`."""

    model_config = ConfigDict(
        extra="ignore",
        protected_namespaces=(),
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [{"model": "my-model", "instructions": "Be brief.", "input": "What is deep learning?"}]
        },
    )

    model: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_NAME_CHARS,
        description="May be omitted when the server serves exactly one model or has a default model.",
    )
    input: Annotated[InputItems, BeforeValidator(_input_list), Field(max_length=MAX_MESSAGES)] = Field(
        default_factory=list,
        description="A string (one user message), or a list of message, function_call and function_call_output items.",
    )
    instructions: str | None = Field(None, description="A system message first; not carried to the next response.")
    previous_response_id: str | None = Field(
        None, min_length=1, max_length=MAX_ID_CHARS, description="Continue a stored response's conversation."
    )
    store: bool | None = Field(None, description="Keep the response for GET and previous_response_id (default).")
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, strict=True)
    temperature: float | None = Field(None, ge=0.0, le=2.0, strict=True, description="0 means greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, strict=True)
    stream: bool | None = Field(None, strict=True)
    metadata: dict[str, str] | None = Field(None, description="Up to 16 pairs, kept with the response.")
    user: str | None = Field(None, max_length=MAX_NAME_CHARS, description="Accepted; not used.")
    text: TextParam | None = None
    tools: list[Annotated[FunctionTool, BeforeValidator(_function_tool)]] | None = Field(
        None, description="Function tools only."
    )
    tool_choice: Annotated[str | dict[str, Any] | None, BeforeValidator(_tool_choice)] = None
    parallel_tool_calls: bool | None = None
    background: Any = Field(None, description="Not supported (only false).")
    reasoning: ReasoningParam | None = Field(None, description="`effort` reaches the chat template.")
    chat_template_kwargs: TemplateKwargs | None = Field(
        None, description='vLLM extension: more chat template variables, e.g. {"enable_thinking": false}.'
    )
    include: list[Any] | None = Field(None, description="Not supported (only empty).")
    conversation: Any = Field(None, description="Not supported; use previous_response_id.")
    prompt: Any = Field(None, description="Not supported.")
    truncation: Any = Field(None, description="Only 'disabled'.")
    max_tool_calls: Any = Field(None, description="Not supported.")
    top_logprobs: Any = Field(None, description="Not supported yet (only 0).")
    context_management: Any = Field(None, description="Not supported.")
    moderation: Any = Field(None, description="Not supported.")
    service_tier: Any = Field(None, description="Only 'auto' or 'default'.")

    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _supported(cls, value: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None
        fine, why = _UNSUPPORTED[info.field_name]
        if not fine(value):
            raise _error("unsupported_parameter", why)
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (
            len(value) > MAX_METADATA_KEYS
            or any(len(k) > MAX_METADATA_KEY_CHARS or len(v) > MAX_METADATA_VALUE_CHARS for k, v in value.items())
        ):
            raise _error(
                "metadata_limits",
                f"at most {MAX_METADATA_KEYS} pairs, keys up to {MAX_METADATA_KEY_CHARS} characters, values up to "
                f"{MAX_METADATA_VALUE_CHARS}",
            )
        return value

    def chat_body(self, model: str, earlier: Sequence[InputItem] = ()) -> dict[str, Any]:
        """The chat completions request this response is generated with (lmfleet.protocol.openai's
        ChatCompletionRequest validates it): `instructions` as a system message, then the `earlier` items (a
        stored conversation), then `input`."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        messages += chat_messages([*earlier, *self.input])
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "stream": bool(self.stream),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_completion_tokens": self.max_output_tokens,
            "user": self.user,
        }
        text_format = self.text.format if self.text and self.text.format else None
        if text_format is not None and text_format.chat_response_format() is not None:
            body["response_format"] = text_format.chat_response_format()
        if self.tools:
            body["tools"] = [tool.chat_tool() for tool in self.tools]
        if self.tool_choice is not None:
            choice = self.tool_choice
            body["tool_choice"] = (
                {"type": "function", "function": {"name": choice["name"]}} if isinstance(choice, dict) else choice
            )
        if self.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = self.parallel_tool_calls
        if self.reasoning is not None and self.reasoning.effort is not None:
            body["reasoning_effort"] = self.reasoning.effort
        if self.chat_template_kwargs:
            body["chat_template_kwargs"] = self.chat_template_kwargs
        return body

    def echoed(self) -> dict[str, Any]:
        """The request's settings as every `Response` object repeats them."""
        text_format = (
            self.text.format if self.text and self.text.format else TextFormat.model_validate({"type": "text"})
        )
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {},
            "parallel_tool_calls": True if self.parallel_tool_calls is None else self.parallel_tool_calls,
            "previous_response_id": self.previous_response_id,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "text": {"format": text_format.model_dump(by_alias=True, exclude_none=True)},
            "tool_choice": self.tool_choice or "auto",
            "tools": [tool.model_dump() for tool in self.tools or []],
            "user": self.user,
            "reasoning": self.reasoning.echoed() if self.reasoning is not None else None,
        }


# ---------------------------------------------------------------------------------------------------------------
# The response (field names and shapes as OpenAI's published schema has them)

ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus = "in_progress"
    content: list[OutputText] = Field(default_factory=list)

    def as_input(self) -> MessageItem:
        return MessageItem.model_validate(
            {
                "id": self.id,
                "role": "assistant",
                "content": [{"type": "output_text", "text": p.text} for p in self.content],
            }
        )


class FunctionCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    status: ItemStatus = "in_progress"
    call_id: str
    name: str
    arguments: str = ""

    def as_input(self) -> FunctionCallItem:
        return FunctionCallItem(
            type="function_call", id=self.id, call_id=self.call_id, name=self.name, arguments=self.arguments
        )


class ReasoningOutput(BaseModel):
    """The model's reasoning before its answer: the text in one `reasoning_text` part of `content`; `summary` stays
    empty (no summary is made)."""

    id: str
    type: Literal["reasoning"] = "reasoning"
    status: ItemStatus = "in_progress"
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)

    def as_input(self) -> ReasoningInputItem:
        return ReasoningInputItem(type="reasoning", id=self.id, summary=list(self.summary), content=list(self.content))


OutputItem = Annotated[OutputMessage | FunctionCall | ReasoningOutput, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> ResponseUsage:
        """The chat path's usage in the Responses API's names."""
        details = usage.completion_tokens_details
        return cls(
            input_tokens=usage.prompt_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=usage.prompt_tokens_details.cached_tokens),
            output_tokens=usage.completion_tokens,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=details.reasoning_tokens if details else 0),
            total_tokens=usage.total_tokens,
        )


class ResponseError(BaseModel):
    code: Literal["server_error", "rate_limit_exceeded", "invalid_prompt"]
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


def _absent_if_none(value: Any) -> bool:
    return value is None


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "failed", "in_progress", "incomplete"] = "in_progress"
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponseUsage | None = Field(None, exclude_if=_absent_if_none)  # the schema has no null usage
    store: bool
    truncation: Literal["disabled"] = "disabled"
    # echoed from the request (CreateResponseRequest.echoed)
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str]
    parallel_tool_calls: bool
    previous_response_id: str | None
    temperature: float
    top_p: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    user: str | None = Field(None, exclude_if=_absent_if_none)  # a string or absent
    reasoning: dict[str, Any] | None = None  # the request's reasoning options (effort, summary), if any


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


class ItemList(BaseModel):
    """`GET /v1/responses/{id}/input_items`: `data` holds each item's `resource()`."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


# ---------------------------------------------------------------------------------------------------------------
# Stream events (`event: <type>` / `data: <event>`), each with the stream's next `sequence_number`


class StreamEvent(BaseModel):
    type: str
    sequence_number: int


class ResponseEvent(StreamEvent):
    """response.created, .in_progress, .completed, .incomplete, .failed"""

    response: Response


class OutputItemEvent(StreamEvent):
    """response.output_item.added, .done"""

    output_index: int
    item: OutputItem


class ItemEvent(StreamEvent):
    """An event about one output item."""

    item_id: str
    output_index: int


class ContentPartEvent(ItemEvent):
    """response.content_part.added, .done"""

    content_index: int
    part: Annotated[OutputText | ReasoningText, Field(discriminator="type")]


class _TextEvent(ItemEvent):
    content_index: int = 0
    logprobs: list[Any] = Field(default_factory=list)


class TextDeltaEvent(_TextEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str


class TextDoneEvent(_TextEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str


class ReasoningDeltaEvent(ItemEvent):
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"
    content_index: int = 0
    delta: str


class ReasoningDoneEvent(ItemEvent):
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"
    content_index: int = 0
    text: str


class ArgumentsDeltaEvent(ItemEvent):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    delta: str


class ArgumentsDoneEvent(ItemEvent):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    name: str
    arguments: str


class ErrorEvent(StreamEvent):
    type: Literal["error"] = "error"
    code: str | None
    message: str
    param: str | None
