"""The public wire format of Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`). Data
only (pydantic, no I/O). Field names and shapes as Anthropic's API reference and the `anthropic` SDK's types have
them.

Owns:
  * parsing a `MessagesRequest` (and a `CountTokensRequest`, the same conversation without the sampling knobs)
    once, at the edge: `system` as a string or text blocks; `messages` of `user` and `assistant` turns whose
    content is a string or blocks: `text`, `tool_use` (assistant) and `tool_result` (user; its content a string or
    text blocks; with `is_error` its text goes to the model as it is); custom `tools` (name, description,
    input_schema) and `tool_choice` (auto, any, tool, none; disable_parallel_tool_use); `max_tokens` (required),
    `stop_sequences`, `temperature`, `top_p`, `top_k`, `output_config.format` (a JSON schema the answer follows),
    `stream`.
    What lmfleet cannot do is a 400 naming it: image, document and other blocks, server tools (web search, code
    execution, ...), `mcp_servers`, `container`, and a last message from the assistant (Anthropic continues it;
    the chat path starts a new turn). Hints that change nothing lmfleet can act on are accepted and ignored:
    `cache_control` anywhere (the engines reuse prompt prefixes on their own), `metadata`, `service_tier`,
    `context_management`, `output_config.effort`; `thinking` (see Reasoning below) is taken;
  * the translation of a request into the body of the chat completions request lmfleet generates it with
    (`chat_body`): a Messages request IS a chat request underneath, so the chat path's checks, limits, failover,
    resume and tool grammar apply unchanged (tool_choice `any` is chat's `required`, `tool` a named function;
    an assistant turn's `thinking` blocks are its message's `reasoning_content`).
    `anthropic_loc` names the chat request's parameters the Anthropic way, for its 400s;
  * the answer (`Message`: thinking, text and tool_use blocks, `stop_reason`, `stop_sequence`, `usage`), its
    stream events (message_start, content_block_start / _delta (text, input_json, thinking) / _stop,
    message_delta, message_stop) and `TokenCount`.

Reasoning: a model's reasoning (split from its answer by the worker's reasoning parser) is a `thinking` block
before the answer's blocks (lmfleet.api.messages renders it). Its `signature` is the empty string: Anthropic signs
its thinking so that the reasoning a client sends back can be trusted as the model's own; a local model has no key
to sign with and lmfleet trusts what comes back as it trusts any chat history, but the field is required in
Anthropic's block (the SDK's `ThinkingBlock.signature: str`), so it is there, empty, and no `signature_delta` is
sent. The request's `thinking`: `{"type": "disabled"}` is the chat template variable `enable_thinking: false`
(templates that read it, such as Qwen3's, then write no reasoning; a model that reasons regardless still gets its
thinking block); `enabled` (its `budget_tokens` is not enforced: `max_tokens` bounds reasoning and answer
together) and `adaptive` leave the model as it is, thinking if it does. Earlier assistant turns' `thinking` blocks
go back to the chat template as that message's `reasoning_content` (joined; their signatures are not checked;
templates such as Qwen3's keep it only after the last user message, as Anthropic drops earlier turns' thinking);
`redacted_thinking` blocks (encrypted by Anthropic, unreadable here) are dropped.

Usage: the prompt tokens a worker served from its prefix cache are `cache_read_input_tokens`, the rest
`input_tokens` (Anthropic's total input is the sum of the three); nothing is written to a cache on request, so
`cache_creation_input_tokens` is 0.

Does not own: turning chat answers into messages and events (lmfleet.api.messages), spelling errors
(lmfleet.errors.anthropic_body: `AnthropicError` here is its shape, for the OpenAPI document).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError, from_json

from lmfleet.protocol.openai import MAX_MESSAGES, MAX_NAME_CHARS, MAX_TOKENS, FinishReason
from lmfleet.protocol.openai import Usage as ChatUsage

MAX_ID_CHARS = 256


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _error(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


# ---------------------------------------------------------------------------------------------------------------
# Content blocks of the request


class TextBlockParam(BaseModel):
    model_config = ConfigDict(extra="ignore")  # cache_control, citations

    type: Literal["text"]
    text: str


class ToolUseBlockParam(BaseModel):
    """A call the model made in an earlier turn."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    input: dict[str, Any]

    def chat_tool_call(self) -> dict[str, Any]:
        arguments = json.dumps(self.input, ensure_ascii=False)
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}


def _text_blocks(value: Any) -> Any:
    """A string, or a list of text blocks (other blocks are refused, naming their place)."""
    if isinstance(value, str) or value is None:
        return value
    if not isinstance(value, list):
        raise _error("content_type", "must be a string or a list of text blocks")
    for i, block in enumerate(value):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text":
            raise _error("unsupported_content_block", f"block {i} has type {kind!r}; only 'text' blocks are supported")
    return value


TextContent = Annotated[str | list[TextBlockParam], BeforeValidator(_text_blocks)]


def _chat_text(content: str | list[TextBlockParam]) -> str | list[dict[str, str]]:
    """Text content as the chat path takes it (text parts it joins by its own rule)."""
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": block.text} for block in content]


class ToolResultBlockParam(BaseModel):
    """What the client's tool returned for a call."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    content: TextContent = ""
    is_error: bool | None = None

    def chat_message(self) -> dict[str, Any]:
        return {"role": "tool", "tool_call_id": self.tool_use_id, "content": _chat_text(self.content)}


class ThinkingBlockParam(BaseModel):
    """Reasoning of an earlier assistant turn: it goes back to the chat template (`reasoning_content`)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["thinking"]
    thinking: str
    signature: str | None = Field(None, description="Accepted; not checked (lmfleet's own are empty).")


class RedactedThinkingBlockParam(BaseModel):
    """Reasoning Anthropic encrypted: accepted, and dropped from the prompt (nothing here can read it)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["redacted_thinking"]


ContentBlockParam = Annotated[
    TextBlockParam | ToolUseBlockParam | ToolResultBlockParam | ThinkingBlockParam | RedactedThinkingBlockParam,
    Field(discriminator="type"),
]
_BLOCK_TYPES = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")
_ROLE_BLOCKS = {"user": ("text", "tool_result"), "assistant": ("text", "tool_use", "thinking", "redacted_thinking")}


def _blocks(value: Any) -> Any:
    """A string (one text block), or a list of blocks of the types lmfleet takes."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise _error("content_type", "must be a string or a list of content blocks")
    for i, block in enumerate(value):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in _BLOCK_TYPES:
            raise _error(
                "unsupported_content_block",
                f"block {i} has type {kind!r}; lmfleet takes text, tool_use, tool_result and thinking blocks",
            )
    return value


def _untagged(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Errors inside a block name its place (`content.1.input`), not also its type, which pydantic adds for a
    tagged union (`content.1.tool_use.input`)."""
    try:
        return handler(value)
    except ValidationError as exc:
        details = [
            InitErrorDetails(
                type=PydanticCustomError(e["type"], e["msg"]),
                loc=tuple(p for i, p in enumerate(e["loc"]) if not (i == 1 and p in _BLOCK_TYPES)),
                input=e["input"],
            )
            for e in exc.errors()
        ]
        raise ValidationError.from_exception_data(exc.title, details) from None


class MessageParam(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["user", "assistant"]
    content: Annotated[list[ContentBlockParam], BeforeValidator(_blocks), WrapValidator(_untagged)]

    @model_validator(mode="after")
    def _blocks_of_the_role(self) -> MessageParam:
        for i, block in enumerate(self.content):
            if block.type not in _ROLE_BLOCKS[self.role]:
                raise _error("block_role", f"content block {i}: {block.type} blocks belong in the other role's turns")
        return self

    def chat_messages(self) -> list[dict[str, Any]]:
        """This turn as chat messages. A user turn: its tool results as `tool` messages and its text as a user
        message, in their order; an assistant turn: one message with its text, its tool calls and its thinking
        (`reasoning_content`)."""
        if self.role == "assistant":
            texts = [{"type": "text", "text": b.text} for b in self.content if isinstance(b, TextBlockParam)]
            calls = [b.chat_tool_call() for b in self.content if isinstance(b, ToolUseBlockParam)]
            thoughts = [b.thinking for b in self.content if isinstance(b, ThinkingBlockParam)]
            message: dict[str, Any] = {"role": "assistant", "content": texts or (None if calls else "")}
            if calls:
                message["tool_calls"] = calls
            if thoughts:
                message["reasoning_content"] = "".join(thoughts)
            return [message]
        out: list[dict[str, Any]] = []
        for block in self.content:
            if isinstance(block, ToolResultBlockParam):
                out.append(block.chat_message())
            elif isinstance(block, TextBlockParam):
                if out and out[-1]["role"] == "user":
                    out[-1]["content"].append({"type": "text", "text": block.text})
                else:
                    out.append({"role": "user", "content": [{"type": "text", "text": block.text}]})
        return out


# ---------------------------------------------------------------------------------------------------------------
# Tools, tool choice, output format, thinking


def _custom_tool(value: Any) -> Any:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in (None, "custom"):
        raise _error(
            "unsupported_tool",
            f"tools of type {kind!r} are not supported; only custom tools (name, description, input_schema) are",
        )
    return value


class ToolParam(BaseModel):
    """A custom tool. The chat path's rules for function names then apply (letters, digits, `_.-`, up to 64)."""

    model_config = ConfigDict(extra="ignore")  # cache_control, input_examples, defer_loading, ...

    type: Literal["custom"] | None = None
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    description: str | None = None
    input_schema: dict[str, Any] = Field(description="The JSON schema of the tool's input.")
    strict: bool | None = None

    def chat_tool(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "description": self.description}
        function |= {"parameters": self.input_schema, "strict": self.strict}
        return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


class ToolChoiceParam(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, min_length=1, max_length=MAX_NAME_CHARS, description="With type 'tool'.")
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _tool_needs_name(self) -> ToolChoiceParam:
        if self.type == "tool" and self.name is None:
            raise _error("missing_tool_name", "a tool_choice of type 'tool' needs the tool's 'name'")
        return self

    def chat_tool_choice(self) -> str | dict[str, Any]:
        if self.type == "tool":
            return {"type": "function", "function": {"name": self.name}}
        return {"auto": "auto", "any": "required", "none": "none"}[self.type]


class JsonOutputFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: JsonOutputFormat | None = None
    effort: str | None = Field(None, description="Accepted; not used.")


class ThinkingConfig(BaseModel):
    """Whether the model thinks: `disabled` is the chat template's `enable_thinking: false`; `enabled` and
    `adaptive` leave the model as it is (module docstring: Reasoning)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, description="Accepted; not enforced (max_tokens bounds the answer).")

    def chat_template_kwargs(self) -> dict[str, Any]:
        return {"enable_thinking": False} if self.type == "disabled" else {}


# ---------------------------------------------------------------------------------------------------------------
# The requests

# Parameters lmfleet cannot honour: the values that are fine (absent) and what the 400 says.
_UNSUPPORTED: dict[str, str] = {
    "mcp_servers": "MCP servers (connectors) are not supported",
    "container": "containers (the code execution tool) are not supported",
}


class _Conversation(BaseModel):
    """What `/v1/messages` and `/v1/messages/count_tokens` share: the prompt, and its translation."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)

    model: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_NAME_CHARS,
        description="May be omitted when the server serves exactly one model or has a default model.",
    )
    messages: list[MessageParam] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: TextContent | None = Field(None, description="A string or text blocks: a system message first.")
    tools: list[Annotated[ToolParam, BeforeValidator(_custom_tool)]] | None = Field(
        None, description="Custom tools only."
    )
    tool_choice: ToolChoiceParam | None = None
    output_config: OutputConfig | None = None
    thinking: ThinkingConfig | None = Field(None, description="`disabled`: the template's enable_thinking=false.")
    mcp_servers: Any = Field(None, description="Not supported.")
    container: Any = Field(None, description="Not supported.")

    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _supported(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise _error("unsupported_parameter", _UNSUPPORTED[str(info.field_name)])
        return value

    @field_validator("messages")
    @classmethod
    def _ends_with_the_user(cls, value: list[MessageParam]) -> list[MessageParam]:
        if value and value[-1].role == "assistant":
            raise _error(
                "assistant_prefill",
                "the last message must be the user's: continuing an assistant message is not supported",
            )
        return value

    def chat_body(self) -> dict[str, Any]:
        """The chat completions request this conversation is generated with (lmfleet.protocol.openai's
        ChatCompletionRequest validates it): `system` as a system message, then each turn's messages. It names
        the model as the client did."""
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": _chat_text(self.system)})
        for turn in self.messages:
            messages += turn.chat_messages()
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.tools:
            body["tools"] = [tool.chat_tool() for tool in self.tools]
        if self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice.chat_tool_choice()
            if self.tool_choice.disable_parallel_tool_use is not None:
                body["parallel_tool_calls"] = not self.tool_choice.disable_parallel_tool_use
        if self.output_config is not None and self.output_config.format is not None:
            schema = {"name": "output", "schema": self.output_config.format.json_schema}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        if self.thinking is not None and (kwargs := self.thinking.chat_template_kwargs()):
            body["chat_template_kwargs"] = kwargs
        return body


class MessagesRequest(_Conversation):
    """`POST /v1/messages`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "my-model",
                    "max_tokens": 256,
                    "system": "Be brief.",
                    "messages": [{"role": "user", "content": "What is deep learning?"}],
                }
            ]
        }
    )

    max_tokens: int = Field(ge=1, le=MAX_TOKENS, strict=True, description="Required: the most tokens to generate.")
    stop_sequences: list[str] | None = Field(None, description="Text that ends the answer (not included in it).")
    temperature: float | None = Field(None, ge=0.0, le=1.0, strict=True, description="0 means greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, strict=True)
    top_k: int | None = Field(None, ge=0, le=1_000_000, strict=True, description="0 means off.")
    stream: bool | None = Field(None, strict=True)
    metadata: dict[str, Any] | None = Field(None, description="Accepted; not used.")
    service_tier: Literal["auto", "standard_only"] | None = Field(None, description="Accepted; not used.")

    def chat_body(self) -> dict[str, Any]:
        body = super().chat_body()
        body |= {
            "max_completion_tokens": self.max_tokens,
            "stop": self.stop_sequences,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stream": bool(self.stream),
        }
        return body


class CountTokensRequest(_Conversation):
    """`POST /v1/messages/count_tokens`: the prompt of a Messages request, counted as it would be generated."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "my-model", "messages": [{"role": "user", "content": "Hello"}]}]}
    )


def anthropic_loc(loc: Sequence[Any]) -> tuple[Any, ...]:
    """A chat request parameter's location (a validation error's `loc`), as the Messages request names it. A chat
    message is not the Messages request's message of the same index (the system message, split tool results):
    errors inside one name `messages`."""
    if not loc:
        return ()
    head, rest = loc[0], tuple(loc[1:])
    if head == "messages":
        return ("messages",)
    if head == "tools" and len(rest) >= 2 and rest[1] == "function":
        inner = rest[2:]
        if inner and inner[0] == "parameters":
            inner = ("input_schema", *inner[1:])
        return ("tools", rest[0], *inner)
    if head == "stop":  # a list: keep which sequence
        return ("stop_sequences", *rest)
    renamed = {
        "max_completion_tokens": ("max_tokens",),
        "response_format": ("output_config", "format"),
        "parallel_tool_calls": ("tool_choice", "disable_parallel_tool_use"),
    }
    if head in renamed:
        return renamed[head]
    return (head, *rest)


# ---------------------------------------------------------------------------------------------------------------
# The answer

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


def stop_reason(finish_reason: FinishReason | None, stop: str | None) -> StopReason:
    """Why the answer ended, as Anthropic says it, from the chat path's finish reason and the stop sequence that
    ended it (if one did)."""
    if finish_reason == "length":
        return "max_tokens"
    if finish_reason == "tool_calls":
        return "tool_use"
    return "stop_sequence" if stop is not None else "end_turn"


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments (JSON text) as a tool_use block's `input`: read as the Anthropic SDK reads a
    streamed `partial_json`, so that a call cut short by `max_tokens` reads the same streamed or not; anything but
    an object is `{}`."""
    try:
        value = from_json(arguments, allow_partial=True) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str = ""


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ThinkingBlock(BaseModel):
    """The model's reasoning before its answer; `signature` is always empty (module docstring: Reasoning)."""

    type: Literal["thinking"] = "thinking"
    thinking: str = ""
    signature: str = ""


ContentBlock = Annotated[TextBlock | ToolUseBlock | ThinkingBlock, Field(discriminator="type")]


class AnthropicUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @classmethod
    def of(cls, usage: ChatUsage) -> AnthropicUsage:
        cached = usage.prompt_tokens_details.cached_tokens
        return cls(
            input_tokens=usage.prompt_tokens - cached,
            output_tokens=usage.completion_tokens,
            cache_read_input_tokens=cached,
        )


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlock] = Field(default_factory=list)
    stop_reason: StopReason | None = None  # null only in message_start
    stop_sequence: str | None = None
    usage: AnthropicUsage


class AnthropicErrorObject(BaseModel):
    type: str  # Anthropic's error type (lmfleet.errors maps each status to one)
    message: str


class AnthropicError(BaseModel):
    """Every error on these routes has this body (lmfleet.errors.anthropic_body), the stream's `error` event too."""

    type: Literal["error"] = "error"
    error: AnthropicErrorObject
    request_id: str | None = None


class TokenCount(BaseModel):
    """`POST /v1/messages/count_tokens`: the prompt's tokens, system prompt and tools included."""

    input_tokens: int


# ---------------------------------------------------------------------------------------------------------------
# Stream events (`event: <type>` / `data: <event>`)


class MessageStartEvent(BaseModel):
    type: Literal["message_start"] = "message_start"
    message: Message


class ContentBlockStartEvent(BaseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlock


class TextDelta(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJsonDelta(BaseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ThinkingDelta(BaseModel):
    type: Literal["thinking_delta"] = "thinking_delta"
    thinking: str


class ContentBlockDeltaEvent(BaseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: TextDelta | InputJsonDelta | ThinkingDelta


class ContentBlockStopEvent(BaseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDelta(BaseModel):
    stop_reason: StopReason
    stop_sequence: str | None


class MessageDeltaEvent(BaseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDelta
    usage: AnthropicUsage  # cumulative: Anthropic's message_delta usage has the same fields


class MessageStopEvent(BaseModel):
    type: Literal["message_stop"] = "message_stop"


StreamEvent = (
    MessageStartEvent
    | ContentBlockStartEvent
    | ContentBlockDeltaEvent
    | ContentBlockStopEvent
    | MessageDeltaEvent
    | MessageStopEvent
)
