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
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, tools: Any = None
    ) -> list[int]:
        if any(m["role"] == "forbidden" for m in messages):
            raise ChatTemplateError("roles must be user or assistant")
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.encode(text + ("assistant:" if add_generation_prompt else ""))


class ScriptedEngine:
    """Answers every prompt with `script` (as bytes), one token per step, then end-of-sequence.

    With `continuing`, it acts like a deterministic model instead: the token at context position p is
    `script[p % len(script)]`, so a request whose prompt carries earlier output (a resumed generation) continues it
    exactly, and with `ignore_eos` it never ends on its own.

    Asked for log probabilities, it reports `fake_logprob(position, token)` for the token at each context position,
    with alternatives ids 1, 2, ... (prompt ones on the first output, as engines do)."""

    def __init__(
        self,
        script: str = "Hello wörld 🙂 again.",
        max_model_len: int = 256,
        step_s: float = 0.0,
        *,
        continuing: bool = False,
    ) -> None:
        self.script = list(script.encode())
        self.continuing = continuing
        self.step_s = step_s  # a pause per step, so requests stay running while a test looks at them
        self._max_len = max_model_len
        self.running: dict[str, tuple[EngineRequest, int]] = {}
        self.aborted: set[str] = set()
        self.steps = 0

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

    def abort_request(self, request_id: str) -> None:
        self.aborted.add(request_id)

    def step(self) -> list[EngineOutput]:
        self.steps += 1
        if self.step_s:
            time.sleep(self.step_s)
        outs = []
        for rid, (req, n) in list(self.running.items()):
            if rid in self.aborted:
                del self.running[rid]
                outs.append(EngineOutput(rid, [], FinishReason.ABORT))
                continue
            if n >= len(self.script) and not req.params.ignore_eos:
                del self.running[rid]
                outs.append(EngineOutput(rid, [], FinishReason.STOP))
                continue
            offset = len(req.prompt_token_ids) if self.continuing else 0
            token = self.script[(offset + n) % len(self.script)]
            position = len(req.prompt_token_ids) + n
            n += 1
            if n >= req.params.max_new_tokens:
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
        return outs

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.running),
            waiting=0,
            tokens_in_flight=sum(len(r.prompt_token_ids) + n for r, n in self.running.values()),
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
