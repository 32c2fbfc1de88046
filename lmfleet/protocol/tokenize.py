"""The public wire format of `POST /tokenize` and `POST /detokenize`, in vLLM's shapes. Data only (pydantic).

Tokenize takes `prompt` (tokenized as a document; `add_special_tokens`, default true) or `messages` (rendered with
the model's chat template; `add_generation_prompt`, default true) and answers `count`, `max_model_len` and
`tokens`; detokenize takes `tokens` and answers `prompt`. vLLM's other knobs are refused by name when set
(`return_token_strs`, `continue_final_message`, `chat_template`, `chat_template_kwargs`, `tools`, and
`add_special_tokens: true` with `messages`: the chat template adds the model's special tokens itself).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lmfleet.protocol.openai import MAX_MESSAGES, MAX_NAME_CHARS, ChatMessage
from lmfleet.protocol.worker import MAX_TOKEN_ID
from lmfleet.protocol.worker import DetokenizeRequest as WorkerDetokenize
from lmfleet.protocol.worker import TokenizeRequest as WorkerTokenize

_REFUSED = {
    "return_token_strs": "token strings are not returned",
    "continue_final_message": "continue_final_message is not supported",
    "chat_template": "only the model's own chat template is used",
    "chat_template_kwargs": "chat_template_kwargs are not supported",
    "tools": "tools are not supported",
}


class TokenizeRequest(BaseModel):
    """`POST /tokenize`: exactly one of `prompt` and `messages`."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str | None = Field(None, min_length=1, max_length=MAX_NAME_CHARS)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool | None = Field(
        None, strict=True, description="prompt: add the model's special tokens (default true); messages: only false."
    )
    add_generation_prompt: bool = Field(True, strict=True, description="messages: end with the assistant's turn.")
    return_token_strs: bool | None = None
    continue_final_message: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None

    @field_validator(*_REFUSED)
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, False, {}, []):
            raise PydanticCustomError("unsupported_parameter", _REFUSED[str(info.field_name)])
        return value

    @field_validator("add_special_tokens")
    @classmethod
    def _not_with_messages(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value and info.data.get("messages") is not None:
            raise PydanticCustomError(
                "unsupported_parameter", "must be false with messages: the chat template adds the special tokens"
            )
        return value

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("prompt_or_messages", "give exactly one of prompt and messages")
        return self

    def to_worker(self, model: str) -> WorkerTokenize:
        return WorkerTokenize(
            model=model,
            prompt=self.prompt,
            messages=[m.to_worker() for m in self.messages] if self.messages is not None else None,
            add_special_tokens=self.add_special_tokens is not False,
            add_generation_prompt=self.add_generation_prompt,
        )


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: None = None


class DetokenizeRequest(BaseModel):
    """`POST /detokenize`."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str | None = Field(None, min_length=1, max_length=MAX_NAME_CHARS)
    tokens: list[int] = Field(max_length=1 << 20)

    @field_validator("tokens")
    @classmethod
    def _ids(cls, value: list[int]) -> list[int]:
        if any(not 0 <= t <= MAX_TOKEN_ID for t in value):
            raise PydanticCustomError("token_id", f"token ids must be in [0, {MAX_TOKEN_ID}]")
        return value

    def to_worker(self, model: str) -> WorkerDetokenize:
        return WorkerDetokenize(model=model, tokens=self.tokens)


class DetokenizeResponse(BaseModel):
    prompt: str
