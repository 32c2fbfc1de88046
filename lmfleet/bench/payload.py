"""What each request of `lmfleet bench` sends: the endpoint's body (chat messages or a prompt), where its text
comes back, and the prompts.

Owns `ENDPOINTS` (the routes `--endpoint` offers), `make_prompt` (different words per request, so no server answers
from a prefix cache), `build_payload`, and the conversations of --multi-turn: the system prompt every user shares
(`system_prompt`), each user turn's words (`user_turn`) and the messages of a turn (`Conversation`: the system
prompt, then every earlier turn and its answer). Does not own: sending (lmfleet.bench.load).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmfleet.bench.settings import BenchSettings

# Common English words: most are one token in any BPE vocabulary, so N words is roughly N prompt tokens.
_WORDS = (
    "the of and to in is was for that on as with by it at from his an were are which this be or has had not "
    "first one their its new after but who they have her she two been other when there all during into school "
    "time may years more most only over city some world would where later up such used many can state about "
    "national out known university united then made also three united between team under name part work water "
    "house river music game early long family group people season village area line well high small power"
).split()


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _chat_delta_text(choice: dict[str, Any]) -> str:
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return ""
    # Reasoning models stream their thinking in a separate field; it is output all the same.
    return _text(delta.get("content")) or _text(delta.get("reasoning_content")) or _text(delta.get("reasoning"))


def _chat_message_text(choice: dict[str, Any]) -> str:
    message = choice.get("message")
    if not isinstance(message, dict):
        return ""
    return _text(message.get("content")) + _text(message.get("reasoning_content"))


@dataclass(frozen=True)
class Endpoint:
    """How one OpenAI route takes a prompt and where its text comes back."""

    path: str
    prompt_body: Callable[[str], dict[str, Any]]
    logprobs_body: Callable[[int], dict[str, Any]]  # ask for log probabilities with k alternatives
    stream_text: Callable[[dict[str, Any]], str]  # a streamed choice -> the text it adds
    full_text: Callable[[dict[str, Any]], str]  # a non-streamed choice -> its text


ENDPOINTS: dict[str, Endpoint] = {
    "chat": Endpoint(
        path="/chat/completions",
        prompt_body=lambda prompt: {"messages": [{"role": "user", "content": prompt}]},
        logprobs_body=lambda k: {"logprobs": True, "top_logprobs": k},
        stream_text=_chat_delta_text,
        full_text=_chat_message_text,
    ),
    "completions": Endpoint(
        path="/completions",
        prompt_body=lambda prompt: {"prompt": prompt},
        logprobs_body=lambda k: {"logprobs": k},
        stream_text=lambda choice: _text(choice.get("text")),
        full_text=lambda choice: _text(choice.get("text")),
    ),
}


def make_prompt(settings: BenchSettings, index: int) -> str:
    """The prompt of request `index`: --prompt as given, else --prompt-tokens words drawn with seed `index`, so
    prompts differ from the first word and no server can answer from a prefix cache."""
    if settings.prompt is not None:
        return settings.prompt
    rng = random.Random(index)
    return " ".join(rng.choice(_WORDS) for _ in range(settings.prompt_tokens))


def system_prompt(settings: BenchSettings) -> str | None:
    """The system prompt every user of --multi-turn shares: --system-tokens words, the same in every run."""
    if not settings.system_tokens:
        return None
    rng = random.Random("system")
    return " ".join(rng.choice(_WORDS) for _ in range(settings.system_tokens))


def user_turn(settings: BenchSettings, user: int, turn: int) -> str:
    """What `user` says in `turn` (both from 0): --prompt as given, else --prompt-tokens words of its own."""
    if settings.prompt is not None:
        return settings.prompt
    rng = random.Random(f"user {user} turn {turn}")
    return " ".join(rng.choice(_WORDS) for _ in range(settings.prompt_tokens))


class Conversation:
    """One user's chat so far: the shared system prompt, then each turn's message and the answer it got."""

    def __init__(self, settings: BenchSettings, user: int) -> None:
        self.settings = settings
        self.user = user
        system = system_prompt(settings)
        self.messages: list[dict[str, str]] = [] if system is None else [{"role": "system", "content": system}]
        self.turns = 0  # turns answered

    def ask(self) -> list[dict[str, str]]:
        """The next turn's messages: the whole history and the user's next message (kept once answered)."""
        return [*self.messages, {"role": "user", "content": user_turn(self.settings, self.user, self.turns)}]

    def answered(self, messages: list[dict[str, str]], answer: str) -> None:
        """The turn asked with `messages` got `answer`: both are history now."""
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        self.turns += 1


def build_payload(settings: BenchSettings, model: str, prompt: str | list[dict[str, str]]) -> dict[str, Any]:
    """The body of one request: `prompt` in the endpoint's shape, or chat `messages` as given."""
    body = ENDPOINTS[settings.endpoint].prompt_body(prompt) if isinstance(prompt, str) else {"messages": prompt}
    payload: dict[str, Any] = {
        "model": model,
        **body,
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "stream": settings.stream,
    }
    if settings.stream:
        payload["stream_options"] = {"include_usage": True}
    if settings.ignore_eos:
        payload["ignore_eos"] = True
    if settings.response_format is not None and settings.endpoint == "chat":  # completions take no response_format
        payload["response_format"] = settings.response_format
    if settings.logprobs is not None:
        payload.update(ENDPOINTS[settings.endpoint].logprobs_body(settings.logprobs))
    return payload
