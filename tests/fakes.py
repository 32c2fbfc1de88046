"""Fakes shared by tests: a byte-level tokenizer and a scripted engine (no torch)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from lmfleet.engine.base import EngineOutput, EngineRequest, EngineStats, FinishReason

EOS = 256


class ByteTokenizer:
    """One token per UTF-8 byte; id 256 is end-of-sequence. Multi-byte characters span several tokens."""

    chat_template = None
    eos_token_id = EOS

    def __len__(self) -> int:
        return 257

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, conversation: list[dict[str, Any]], *, add_generation_prompt: bool = False,
                            **_: Any) -> list[int]:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in conversation)
        return self.encode(text + ("assistant:" if add_generation_prompt else ""))


class ScriptedEngine:
    """Answers every prompt with `script` (as bytes), one token per step, then end-of-sequence."""

    def __init__(self, script: str = "Hello wörld 🙂 again.", max_model_len: int = 256, step_s: float = 0.0) -> None:
        self.script = list(script.encode())
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
            token = self.script[n % len(self.script)]
            n += 1
            if n >= req.params.max_new_tokens:
                del self.running[rid]
                outs.append(EngineOutput(rid, [token], FinishReason.LENGTH))
            else:
                self.running[rid] = (req, n)
                outs.append(EngineOutput(rid, [token]))
        return outs

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.running), waiting=0,
                           tokens_in_flight=sum(len(r.prompt_token_ids) + n for r, n in self.running.values()))
