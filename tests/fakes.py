"""Fakes shared by tests: a byte-level tokenizer and a scripted engine (no torch)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from lmfleet.engine.base import (
    ChatTemplateError,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    LoadedModel,
    TokenLogprob,
)

EOS = 256
KV_BYTES_PER_TOKEN = 64  # what ScriptedEngine's prefix cache says a token holds


class ByteTokenizer:
    """The `Tokenizer` protocol with one token per UTF-8 byte; id 256 is end-of-sequence. Multi-byte characters
    span several tokens. Chat prompts use the fallback template's format; a role named "forbidden" is refused."""

    eos_token_ids = (EOS,)

    def __len__(self) -> int:
        return 257

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    chat_template = None

    def grammar_vocabulary(self) -> Any:
        import llguidance

        class Vocabulary:  # what llguidance.TokenizerWrapper reads
            eos_token_id, bos_token_id, special_token_ids = EOS, None, [EOS]
            tokens = [bytes([i]) for i in range(256)] + [b"\xff<eos>"]

            def __call__(self, text: str) -> list[int]:
                return list(text.encode())

        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()))

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 256 else b"</s>"

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Any = None,
        template_kwargs: Any = None,
    ) -> list[int]:
        if any(m["role"] == "forbidden" for m in messages):
            raise ChatTemplateError("roles must be user or assistant")
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.encode(text + ("assistant:" if add_generation_prompt else ""))


# What the thinking tokenizer's templates say, for the worker's `--reasoning-parser auto` to read.
THINKING_TEMPLATES = {
    "qwen3": "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}",
    "deepseek_r1": "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}",
}


class ThinkingTokenizer(ByteTokenizer):
    """The byte tokenizer behind a chat template of a model that thinks first. `qwen3` style: the model writes
    `<think>` itself, and `enable_thinking: false` ends the prompt in an empty `<think></think>` block;
    `deepseek_r1` style: the generation prompt opens `<think>`. Keeps the last messages and template kwargs it
    rendered."""

    def __init__(self, style: str = "qwen3") -> None:
        self.style = style
        self.chat_template = THINKING_TEMPLATES[style]  # type: ignore[assignment]
        self.messages: list[dict[str, Any]] = []
        self.template_kwargs: dict[str, Any] = {}

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Any = None,
        template_kwargs: Any = None,
    ) -> list[int]:
        self.messages, self.template_kwargs = messages, dict(template_kwargs or {})
        ids = super().render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        if not add_generation_prompt:
            return ids
        if self.style == "deepseek_r1":
            return ids + self.encode("<think>\n")
        if self.template_kwargs.get("enable_thinking") is False:
            return ids + self.encode("<think>\n\n</think>\n\n")
        return ids


class ScriptedEngine:
    """Answers every prompt with `script` (as bytes), one token per step, then end-of-sequence.

    With `continuing`, it acts like a deterministic model instead: the token at context position p is
    `script[p % len(script)]`, so a request whose prompt carries earlier output (a resumed generation) continues it
    exactly, and with `ignore_eos` it never ends on its own.

    With `after` (bytes), it acts like a model that writes `script` after the last `after` in its prompt: the
    output goes on from wherever the prompt's text after it leaves the script (a chat template that already wrote
    the script's first bytes, a resumed generation), and ends with the script.

    A request under a grammar (`SamplingParams.constraint`) gets the script's token where the grammar allows it,
    else the highest id it allows (end-of-sequence where the grammar is complete), and stops once the grammar is
    complete.

    Asked for log probabilities, it reports `fake_logprob(position, token)` for the token at each context position,
    with alternatives ids 1, 2, ... (prompt ones on the first output, as engines do).

    With `prefix_cache`, it acts like an engine with a prefix cache that never evicts: a request's first output says
    how many leading tokens of its context it shares with an earlier request's (`cached_tokens`, at most all but the
    last: the last is always computed), and `stats()` counts the look-ups (`prefix_cache_queries`, `_hits`) and
    `KV_BYTES_PER_TOKEN` per cached token in `prefix_cache_kv_bytes`; without it the first output says nothing
    (None), as an engine without a cache."""

    def __init__(
        self,
        script: str = "Hello wörld 🙂 again.",
        max_model_len: int = 256,
        step_s: float = 0.0,
        *,
        continuing: bool = False,
        after: bytes | None = None,
        prefix_cache: bool = False,
    ) -> None:
        self.script = list(script.encode())
        self.continuing = continuing
        self.after = after
        self.step_s = step_s  # a pause per step, so requests stay running while a test looks at them
        self._max_len = max_model_len
        self.running: dict[str, tuple[EngineRequest, int]] = {}
        self.aborted: set[str] = set()  # every id ever aborted (tests read it)
        self._aborting: set[str] = set()  # aborts the next step applies, to the requests running now
        self.steps = 0
        self.prefix_cache = prefix_cache
        self._contexts: list[list[int]] = []  # every context admitted, for the prefix cache
        self._first: dict[str, int] = {}  # requests whose first output is still to come -> their cached tokens
        self._queries = self._hits = 0

    @property
    def max_model_len(self) -> int:
        return self._max_len

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (EOS,)

    @property
    def vocab_size(self) -> int:
        return EOS + 1

    def add_request(self, request: EngineRequest) -> None:
        self.running[request.request_id] = (request, 0)
        if self.prefix_cache:
            context = list(request.prompt_token_ids)
            cached = max((_shared(context, seen) for seen in self._contexts), default=0)
            cached = min(cached, len(context) - 1)
            self._contexts.append(context)
            self._first[request.request_id] = cached
            self._queries += len(context)
            self._hits += cached

    def abort_request(self, request_id: str) -> None:
        self.aborted.add(request_id)
        if request_id in self.running:
            self._aborting.add(request_id)

    def step(self) -> list[EngineOutput]:
        self.steps += 1
        if self.step_s:
            time.sleep(self.step_s)
        outs = []
        for rid, (req, n) in list(self.running.items()):
            if rid in self._aborting:
                self._aborting.discard(rid)
                del self.running[rid]
                outs.append(EngineOutput(rid, [], FinishReason.ABORT))
                continue
            offset = self._offset(req)
            constraint = req.params.constraint
            ended = (offset if self.after is not None else 0) + n >= len(self.script)  # the script is all out
            if ended and not req.params.ignore_eos and constraint is None:
                del self.running[rid]
                outs.append(EngineOutput(rid, [], FinishReason.STOP))
                continue
            token = self.script[(offset + n) % len(self.script)]
            if constraint is not None:
                token = _allowed(constraint.allowed(), None if ended else token)
                if token == EOS or not constraint.advance(token):
                    del self.running[rid]
                    outs.append(EngineOutput(rid, [], FinishReason.STOP))
                    continue
            position = len(req.prompt_token_ids) + n
            n += 1
            if constraint is not None and constraint.finished:
                del self.running[rid]
                out = EngineOutput(rid, [token], FinishReason.STOP)
            elif n >= req.params.max_new_tokens:
                del self.running[rid]
                out = EngineOutput(rid, [token], FinishReason.LENGTH)
            else:
                self.running[rid] = (req, n)
                out = EngineOutput(rid, [token])
            k, k_prompt, prompt = req.params.logprobs, req.params.prompt_logprobs, req.prompt_token_ids
            if k is not None:
                out.logprobs = [fake_logprob(position, token, k)]
            if k_prompt is not None and n == 1:
                out.prompt_logprobs = [None] + [fake_logprob(p, prompt[p], k_prompt) for p in range(1, len(prompt))]
            outs.append(out)
        for out in outs:
            if out.request_id in self._first:
                out.cached_tokens = self._first.pop(out.request_id)
        return outs

    def _offset(self, req: EngineRequest) -> int:
        """Where in the script this request's output starts."""
        if self.after is not None:
            text = bytes(t for t in req.prompt_token_ids if t < EOS)
            return len(text) - text.rindex(self.after) - len(self.after)
        return len(req.prompt_token_ids) if self.continuing else 0

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.running),
            waiting=0,
            tokens_in_flight=sum(len(r.prompt_token_ids) + n for r, n in self.running.values()),
            prefix_cache_queries=self._queries,
            prefix_cache_hits=self._hits,
            prefix_cache_kv_bytes=KV_BYTES_PER_TOKEN * sum(len(c) for c in self._contexts),
        )


class PausingEngine(ScriptedEngine):
    """The scripted engine, which stops stepping once a request has `pause_at` tokens until `release` is set."""

    def __init__(self, pause_at: int, script: str = "Hello wörld 🙂 again.") -> None:
        super().__init__(script)
        self.pause_at = pause_at
        self.release = threading.Event()

    def step(self) -> list[EngineOutput]:
        if any(n >= self.pause_at for _, n in self.running.values()):
            self.release.wait(10)
        return super().step()


def _shared(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _allowed(mask: bytes, wanted: int | None) -> int:
    """`wanted` if the bitmask allows it, else the highest id it allows."""
    ok = [t for t in range(EOS + 1) if t // 8 < len(mask) and mask[t // 8] >> (t % 8) & 1]
    return wanted if wanted in ok else max(ok)


def fake_logprob(position: int, token: int, k: int) -> TokenLogprob:
    """ScriptedEngine's log probability for `token` at context position `position`, with k alternatives."""
    value = -0.25 - position / 64
    return TokenLogprob(token, value, tuple((i, value - i) for i in range(1, k + 1)))


def loaded(engine: Any, name: str = "scripted") -> LoadedModel:
    """What a worker's loader returns, over a fake engine and the byte tokenizer."""
    return LoadedModel(engine, ByteTokenizer(), engine_name=name)


@contextlib.asynccontextmanager
async def running(app: Any) -> AsyncIterator[tuple[ASGIApp, dict[str, Any]]]:
    """Run an app's lifespan (ASGI transports do not) and hand its state to every request, as a server does."""
    async with app.router.lifespan_context(app) as state:

        async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] in ("http", "websocket"):
                scope = {**scope, "state": dict(state or {})}
            await app(scope, receive, send)

        yield asgi, dict(state or {})
