"""FastChat 0.2.36's worker wire format, as its controller, model workers, API server and Gradio server speak it.
Data and pure translation only (pydantic, no I/O).

Owns:
  * `Conversation`: FastChat's conversation template as a worker's `/worker_get_conv_template` sends it
    (`{"conv": {...}}`, `sep_style` an integer of FastChat's `SeparatorStyle`), and `Conversation.prompt(messages)`:
    the prompt FastChat's API server builds from chat messages with it, for every separator style;
  * `TEMPLATES`: FastChat's templates an lmfleet worker can be told to use by name (`--conv-template`), copied from
    FastChat's `conversation.py`; `FALLBACK_TEMPLATE`, FastChat's generic one;
  * `GenerateParams`: the body of `/worker_generate_stream` and `/worker_generate` (the prompt already templated),
    and `StreamChunk`: one object of the answer (each followed by a NUL byte when streamed), whose `text` is
    CUMULATIVE (the prompt in front with `echo`); errors travel in-band with a non-zero `error_code`;
  * `ErrorCode`: FastChat's error codes.

Does not own: serving these routes (lmfleet.worker.fastchat), calling them (lmfleet.api.fastchat_upstream), the
controller's FastChat routes (lmfleet.controller.app), lmfleet's own wire format (protocol.worker).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

# FastChat's controller forgets a worker after this long without a heartbeat; its workers beat every 45 s.
HEARTBEAT_EXPIRY_S = 90.0
SERVER_ERROR_MSG = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"


class ErrorCode(IntEnum):
    """fastchat.constants.ErrorCode."""

    VALIDATION_TYPE_ERROR = 40001
    INVALID_AUTH_KEY = 40101
    INCORRECT_AUTH_KEY = 40102
    NO_PERMISSION = 40103
    INVALID_MODEL = 40301
    PARAM_OUT_OF_RANGE = 40302
    CONTEXT_OVERFLOW = 40303
    RATE_LIMIT = 42901
    QUOTA_EXCEEDED = 42902
    ENGINE_OVERLOADED = 42903
    INTERNAL_ERROR = 50001
    CUDA_OUT_OF_MEMORY = 50002
    GRADIO_REQUEST_ERROR = 50003
    GRADIO_STREAM_UNKNOWN_ERROR = 50004
    CONTROLLER_NO_WORKER = 50005
    CONTROLLER_WORKER_TIMEOUT = 50006


class SepStyle(IntEnum):
    """fastchat.conversation.SeparatorStyle: how a template joins its messages."""

    ADD_COLON_SINGLE = 1
    ADD_COLON_TWO = 2
    ADD_COLON_SPACE_SINGLE = 3
    NO_COLON_SINGLE = 4
    NO_COLON_TWO = 5
    ADD_NEW_LINE_SINGLE = 6
    LLAMA2 = 7
    CHATGLM = 8
    CHATML = 9
    CHATINTERN = 10
    DOLLY = 11
    RWKV = 12
    PHOENIX = 13
    ROBIN = 14
    FALCON_CHAT = 15
    CHATGLM3 = 16
    DEEPSEEK_CHAT = 17
    METAMATH = 18
    YUAN2 = 19


Turn = tuple[str, str | None]  # (role tag, message); None (or ""): the slot the model fills


class Conversation(BaseModel):
    """FastChat's `Conversation` as it travels (`/worker_get_conv_template` answers `{"conv": <this>}`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    system_template: str = "{system_message}"
    system_message: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    messages: tuple[tuple[str, str | None], ...] = ()  # few-shot examples in front of every conversation
    offset: int = 0
    sep_style: int = SepStyle.ADD_COLON_SINGLE  # SepStyle's value (FastChat sends the integer)
    sep: str = "\n"
    sep2: str | None = None
    stop_str: str | list[str] | None = None
    stop_token_ids: list[int] | None = None

    @model_validator(mode="before")
    @classmethod
    def _lists(cls, data: Any) -> Any:
        """FastChat sends its message pairs as lists."""
        if isinstance(data, dict) and isinstance(data.get("messages"), list):
            data = {**data, "messages": [tuple(m) for m in data["messages"]]}
        return data

    @property
    def stop_strings(self) -> list[str]:
        if self.stop_str is None:
            return []
        return [self.stop_str] if isinstance(self.stop_str, str) else list(self.stop_str)

    def prompt(self, messages: Sequence[dict[str, Any]]) -> str:
        """The prompt FastChat's API server builds for chat `messages` (role and text content): the last system
        message replaces the template's, user and assistant messages take the two roles, and the assistant's
        empty slot ends it. ValueError for any other role, or a style FastChat does not have."""
        system = self.system_message
        turns: list[Turn] = list(self.messages)
        for m in messages:
            role, content = m.get("role"), m.get("content")
            if role == "system":
                system = content or ""
            elif role in ("user", "assistant"):
                turns.append((self.roles[0 if role == "user" else 1], content))
            else:
                raise ValueError(
                    f"FastChat conversation templates take system, user and assistant messages, not {role!r}"
                )
        turns.append((self.roles[1], None))
        return self.render(system, turns)

    def render(self, system_message: str, turns: Sequence[Turn]) -> str:
        """FastChat's `Conversation.get_prompt()` with this system message and these turns."""
        style = _STYLES.get(self.sep_style)
        if style is None:
            raise ValueError(f"unknown FastChat separator style {self.sep_style}")
        return style(self, self.system_template.format(system_message=system_message), system_message, turns)


# -- FastChat's separator styles: (conversation, system prompt, system message, turns) -> prompt ------------------

_Style = Callable[[Conversation, str, str, Sequence[Turn]], str]


def _add_colon_single(c: Conversation, sp: str, _sm: str, turns: Sequence[Turn]) -> str:
    return sp + c.sep + "".join(f"{r}: {m}{c.sep}" if m else f"{r}:" for r, m in turns)


def _add_colon_two(c: Conversation, sp: str, _sm: str, turns: Sequence[Turn]) -> str:
    seps = (c.sep, c.sep2 or "")
    return sp + seps[0] + "".join(f"{r}: {m}{seps[i % 2]}" if m else f"{r}:" for i, (r, m) in enumerate(turns))


def _add_colon_space_single(c: Conversation, sp: str, _sm: str, turns: Sequence[Turn]) -> str:
    return sp + c.sep + "".join(f"{r}: {m}{c.sep}" if m else f"{r}: " for r, m in turns)


def _add_new_line_single(c: Conversation, sp: str, _sm: str, turns: Sequence[Turn]) -> str:
    head = "" if sp == "" else sp + c.sep
    return head + "".join(f"{r}\n{m}{c.sep}" if m else f"{r}\n" for r, m in turns)


def _no_colon_single(c: Conversation, sp: str, _sm: str, turns: Sequence[Turn]) -> str:
    return sp + "".join(f"{r}{m}{c.sep}" if m else r for r, m in turns)


def _no_colon_two(c: Conversation, sp: str, _sm: str, turns: Sequence[Turn]) -> str:
    seps = (c.sep, c.sep2 or "")
    return sp + "".join(f"{r}{m}{seps[i % 2]}" if m else r for i, (r, m) in enumerate(turns))


def _rwkv(c: Conversation, sp: str, _sm: str, turns: Sequence[Turn]) -> str:
    out = sp
    for r, m in turns:
        out += f"{r}: " + m.replace("\r\n", "\n").replace("\n\n", "\n") + "\n\n" if m else f"{r}:"
    return out


def _llama2(c: Conversation, sp: str, sm: str, turns: Sequence[Turn]) -> str:
    seps = (c.sep, c.sep2 or "")
    out = sp if sm else "[INST] "
    for i, (_r, m) in enumerate(turns):
        tag = c.roles[i % 2]
        if m:
            out += m + " " if i == 0 else f"{tag} {m}{seps[i % 2]}"
        else:
            out += tag
    return out


def _chatglm(c: Conversation, sp: str, _sm: str, turns: Sequence[Turn]) -> str:
    round_add_n = 1 if c.name == "chatglm2" else 0
    out = sp + c.sep if sp else ""
    for i, (r, m) in enumerate(turns):
        if i % 2 == 0:
            out += f"[Round {i // 2 + round_add_n}]{c.sep}"
        out += f"{r}：{m}{c.sep}" if m else f"{r}："
    return out


def _chatml(c: Conversation, sp: str, _sm: str, turns: Sequence[Turn]) -> str:
    head = "" if sp == "" else sp + c.sep + "\n"
    return head + "".join(f"{r}\n{m}{c.sep}\n" if m else f"{r}\n" for r, m in turns)


def _chatglm3(c: Conversation, sp: str, sm: str, turns: Sequence[Turn]) -> str:
    return (sp if sm else "") + "".join(f"{r}\n{m}" if m else r for r, m in turns)


def _chatintern(c: Conversation, sp: str, _sm: str, turns: Sequence[Turn]) -> str:
    seps = (c.sep, c.sep2 or "")
    out = sp
    for i, (r, m) in enumerate(turns):
        if i % 2 == 0:
            out += "<s>"
        out += f"{r}:{m}{seps[i % 2]}\n" if m else f"{r}:"
    return out


def _dolly(c: Conversation, sp: str, _sm: str, turns: Sequence[Turn]) -> str:
    seps = (c.sep, c.sep2 or "")
    out = sp
    for i, (r, m) in enumerate(turns):
        if m:
            out += f"{r}:\n{m}{seps[i % 2]}" + ("\n\n" if i % 2 == 1 else "")
        else:
            out += f"{r}:\n"
    return out


def _phoenix(c: Conversation, sp: str, _sm: str, turns: Sequence[Turn]) -> str:
    return sp + "".join(f"{r}: <s>{m}</s>" if m else f"{r}: <s>" for r, m in turns)


def _robin(c: Conversation, sp: str, _sm: str, turns: Sequence[Turn]) -> str:
    return sp + c.sep + "".join(f"{r}:\n{m}{c.sep}" if m else f"{r}:\n" for r, m in turns)


def _falcon_chat(c: Conversation, sp: str, sm: str, turns: Sequence[Turn]) -> str:
    head = sp + c.sep if sm else ""
    return head + "".join(f"{r}: {m}{c.sep}" if m else f"{r}:" for r, m in turns)


def _metamath(c: Conversation, sp: str, _sm: str, turns: Sequence[Turn]) -> str:
    out = "" if sp == "" else sp + c.sep
    for i, (r, m) in enumerate(turns):
        starting = ":\n" if i % 2 == 0 else ": " + (c.sep2 or "")
        ending = c.sep if i % 2 == 0 else ""
        out += f"{r}{starting}{m}{ending}" if m else f"{r}{starting}"
    return out


def _deepseek_chat(c: Conversation, sp: str, _sm: str, turns: Sequence[Turn]) -> str:
    seps = (c.sep, c.sep2 or "")
    return sp + "".join(f"{r}: {m}{seps[i % 2]}" if m else f"{r}:" for i, (r, m) in enumerate(turns))


def _yuan2(c: Conversation, sp: str, sm: str, turns: Sequence[Turn]) -> str:
    out = sp + (c.sep2 or "") if sm else ""
    out += "".join(f"{m}<n>" for _r, m in turns if m)
    return out.rstrip("<n>") + c.sep


_STYLES: dict[int, _Style] = {
    SepStyle.ADD_COLON_SINGLE: _add_colon_single,
    SepStyle.ADD_COLON_TWO: _add_colon_two,
    SepStyle.ADD_COLON_SPACE_SINGLE: _add_colon_space_single,
    SepStyle.NO_COLON_SINGLE: _no_colon_single,
    SepStyle.NO_COLON_TWO: _no_colon_two,
    SepStyle.ADD_NEW_LINE_SINGLE: _add_new_line_single,
    SepStyle.LLAMA2: _llama2,
    SepStyle.CHATGLM: _chatglm,
    SepStyle.CHATML: _chatml,
    SepStyle.CHATINTERN: _chatintern,
    SepStyle.DOLLY: _dolly,
    SepStyle.RWKV: _rwkv,
    SepStyle.PHOENIX: _phoenix,
    SepStyle.ROBIN: _robin,
    SepStyle.FALCON_CHAT: _falcon_chat,
    SepStyle.CHATGLM3: _chatglm3,
    SepStyle.DEEPSEEK_CHAT: _deepseek_chat,
    SepStyle.METAMATH: _metamath,
    SepStyle.YUAN2: _yuan2,
}

# -- FastChat's templates by name (fastchat/conversation.py at v0.2.36), for `--conv-template` -----------------------

_FASTCHAT_SYSTEM = (
    "A chat between a curious {who} and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the {who}'s questions."
)
_IM = Conversation(
    name="", roles=("<|im_start|>user", "<|im_start|>assistant"), sep_style=SepStyle.CHATML, sep="<|im_end|>"
)
_IM_SYSTEM = "<|im_start|>system\n{system_message}"
_ZEPHYR = Conversation(
    name="",
    system_template="<|system|>\n{system_message}",
    roles=("<|user|>", "<|assistant|>"),
    sep_style=SepStyle.CHATML,
    sep="</s>",
    stop_token_ids=[2],
    stop_str="</s>",
)

TEMPLATES: dict[str, Conversation] = {
    c.name: c
    for c in (
        Conversation(name="raw", roles=("", ""), sep_style=SepStyle.NO_COLON_SINGLE, sep=""),
        Conversation(
            name="zero_shot",
            system_message=_FASTCHAT_SYSTEM.format(who="human"),
            roles=("Human", "Assistant"),
            sep="\n### ",
            stop_str="###",
        ),
        Conversation(
            name="vicuna_v1.1",
            system_message=_FASTCHAT_SYSTEM.format(who="user"),
            sep_style=SepStyle.ADD_COLON_TWO,
            sep=" ",
            sep2="</s>",
        ),
        Conversation(
            name="llama-2",
            system_template="[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
            roles=("[INST]", "[/INST]"),
            sep_style=SepStyle.LLAMA2,
            sep=" ",
            sep2=" </s><s>",
        ),
        Conversation(
            name="mistral",
            system_template="[INST] {system_message}\n",
            roles=("[INST]", "[/INST]"),
            sep_style=SepStyle.LLAMA2,
            sep=" ",
            sep2="</s>",
        ),
        _IM.model_copy(
            update={
                "name": "qwen-7b-chat",
                "system_template": _IM_SYSTEM,
                "system_message": "You are a helpful assistant.",
                "stop_token_ids": [151643, 151644, 151645],
                "stop_str": "<|endoftext|>",
            }
        ),
        _IM.model_copy(update={"name": "Yi-34b-chat", "stop_token_ids": [2, 6, 7, 8], "stop_str": "<|endoftext|>"}),
        _IM.model_copy(
            update={
                "name": "orca-2",
                "system_template": _IM_SYSTEM,
                "system_message": "You are Orca, an AI language model created by Microsoft. You are a cautious "
                "assistant. You carefully follow instructions. You are helpful and harmless and you follow ethical "
                "guidelines and promote positive behavior.",
                "stop_str": "<|im_end|>",
            }
        ),
        _ZEPHYR.model_copy(update={"name": "zephyr"}),
        _ZEPHYR.model_copy(update={"name": "TinyLlama"}),
    )
}
# What FastChat uses for a model it does not recognise is its one-shot template; this is the same without the
# example exchange.
FALLBACK_TEMPLATE = "zero_shot"


# -- generation -----------------------------------------------------------------------------------------------------


class GenerateParams(BaseModel):
    """The body of `/worker_generate_stream` and `/worker_generate`. A parameter sent as null takes FastChat's
    default, as its model worker does."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str | None = None
    prompt: str
    temperature: float = 1.0  # below 1e-5: greedy
    top_p: float = 1.0  # below 1e-8: greedy
    top_k: int = -1  # -1: off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_new_tokens: int = 256
    stop: str | list[Annotated[str, Field(max_length=4096)]] | None = None
    stop_token_ids: list[int] | None = None
    echo: bool = True  # FastChat's worker echoes the prompt unless told not to
    logprobs: int | None = None
    images: list[Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_take_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class StreamChunk(BaseModel):
    """One object of a FastChat worker's answer. `text` is everything generated so far (the prompt in front with
    `echo`); `logprobs` is FastChat's (OpenAI completions') shape, also cumulative; `error_code` is non-zero for an
    error, whose message is then `text`."""

    model_config = ConfigDict(extra="ignore")

    text: str = ""
    error_code: int = 0
    usage: Usage | None = None
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class EmbeddingsParams(BaseModel):
    """The body of `/worker_get_embeddings` (FastChat's API server sends batches of texts)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str | None = None
    input: list[str] = Field(min_length=1, max_length=2048)
    encoding_format: str | None = None  # "base64": each vector as the base64 of its float32 bytes
