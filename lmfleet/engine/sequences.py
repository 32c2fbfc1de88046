"""The bookkeeping every generating engine shares: its sequences, from `add_request` to their final output.

Owns
  * `Seq`: one admitted request: its tokens so far (prompt, then what it generated), how many it generated, the ids
    that stop it, why it finished, and its prompt's log probabilities until its first output. An engine subclasses
    it with its own state (a sampler chain, a generator, where its KV cells are).
  * `Sequences`: the waiting queue (first in, first out; a preempted sequence goes back to its front), the running
    list (in admission order, which is the engine's cache order where it keeps one), the request ids in flight,
    the aborts asked for, and the counters behind `EngineStats`.
  * `Outputs`: what one step produced, one `EngineOutput` per request touched, in the order they were first touched;
    a request's first output carries `Seq.cached_tokens` (what the engine's prefix cache served, where it has one).

When each method runs (all on the engine's one thread): `add` from `Engine.add_request` (asserting what the worker
checked, refusing what no engine samples with), `abort` from `Engine.abort_request`; then from
`step()`: `apply_aborts` first, `admit` while the engine's cache has room (the engine says so, and reserves it),
`advance` with each token the engine sampled (it says whether the sequence finished, so a caller holding several
tokens for one sequence, as speculative decoding will, feeds them one at a time until it does; they reach the
caller in one output), `finish` and `fail` for what the engine ends itself, `preempt` to send a running sequence
back to the queue, and `drop_finished` last, which takes the finished out of both lists for the engine to free
what they held.

Does not own: the forward pass, sampling, the KV cache or the prefix cache (each engine's), threads
(lmfleet.engine.runner). Imports no torch and no llama.cpp.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from lmfleet.engine.base import EngineOutput, EngineRequest, EngineStats, FinishReason, SamplingParams, TokenLogprob

CONSTRAINT_REFUSED = "the output grammar refused the sampled token"


@dataclass(eq=False)
class Seq:
    """One admitted request. An engine's subclass adds its own fields, each with a default."""

    request: EngineRequest
    stop_ids: frozenset[int]  # end-of-sequence ids (unless ignore_eos) and the request's stop ids
    tokens: list[int] = field(init=False)  # the prompt, then the generated tokens
    num_generated: int = field(default=0, init=False)
    finish: FinishReason | None = field(default=None, init=False)
    # with prompt_logprobs: the prompt's log probabilities so far ([None] for the first token), until the first output
    prompt_logprobs: list[TokenLogprob | None] | None = field(default=None, init=False)
    # leading prompt tokens served from the engine's prefix cache, set by an engine that has one when it first
    # admits the sequence (0: none); reported once, on the first output
    cached_tokens: int | None = field(default=None, init=False)
    emitted: bool = field(default=False, init=False)  # the first output was made

    def __post_init__(self) -> None:
        self.tokens = list(self.request.prompt_token_ids)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def echoing(self) -> bool:
        """The prompt's log probabilities are still being gathered: every prompt position needs its logits."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.request.prompt_token_ids)

    def take_prompt_logprobs(self) -> list[TokenLogprob | None] | None:
        """The prompt's log probabilities, once all are gathered: for the request's first output."""
        if self.echoing:
            return None
        found, self.prompt_logprobs = self.prompt_logprobs, None
        return found


S = TypeVar("S", bound=Seq)


class Outputs:
    """The outputs of one step: one `EngineOutput` per request touched, in the order first touched. A request that
    gets several tokens in one step gets them in one output."""

    def __init__(self) -> None:
        self._by_id: dict[str, EngineOutput] = {}

    def emit(
        self,
        seq: Seq,
        tokens: list[int],
        reason: FinishReason | None = None,
        error: str | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        prompt_logprobs = seq.take_prompt_logprobs()
        out = self._by_id.get(seq.request_id)
        if out is None:
            cached = None if seq.emitted else seq.cached_tokens
            seq.emitted = True
            self._by_id[seq.request_id] = EngineOutput(
                seq.request_id, list(tokens), reason, error, logprobs, prompt_logprobs, cached
            )
            return
        assert not out.finished, "nothing follows a request's final output"
        out.new_token_ids.extend(tokens)
        if logprobs is not None:
            out.logprobs = (out.logprobs or []) + logprobs
        out.finish_reason, out.error = reason, error
        out.prompt_logprobs = out.prompt_logprobs or prompt_logprobs

    def list(self) -> list[EngineOutput]:
        return list(self._by_id.values())


class Sequences(Generic[S]):
    """An engine's sequences, from `add` to `drop_finished` (module docstring). `waiting` and `running` are the
    engine's to read; it changes them only through these methods."""

    def __init__(
        self, *, max_num_seqs: int, max_model_len: int, vocab_size: int, eos_token_ids: tuple[int, ...]
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[S] = deque()
        self.running: list[S] = []  # in admission order: the newest last
        self._ids: set[str] = set()  # every request id waiting or running, until its final output
        self._aborts: set[str] = set()
        # counters for EngineStats, from the engine's start; the engine counts its prefill and decode tokens
        self.prefilled = self.decoded = self.preemptions = 0

    # -- from add_request / abort_request -----------------------------------------------------------------------

    def add(self, request: EngineRequest, new: Callable[[EngineRequest, frozenset[int]], S]) -> S:
        """Queue the sequence `new(request, stop_ids)` builds (with the engine's own state), once the request is
        known to fit (asserted: the worker checked, lmfleet.engine.base) and its sampling parameters are ones every
        engine runs (`EngineRejected` otherwise)."""
        prompt, p = request.prompt_token_ids, request.params
        assert request.request_id not in self._ids, "request ids are unique"
        assert prompt and p.max_new_tokens >= 1, "a request has a prompt and room to generate"
        assert len(prompt) + p.max_new_tokens <= self.max_model_len, "the request fits the context"
        assert 0 <= min(prompt) and max(prompt) < self.vocab_size, "prompt ids are in the vocabulary"
        p.check(self.vocab_size)
        stop_ids = frozenset(p.stop_token_ids if p.ignore_eos else (*p.stop_token_ids, *self.eos_token_ids))
        seq = new(request, stop_ids)
        self._ids.add(request.request_id)
        self.waiting.append(seq)
        return seq

    def abort(self, request_id: str) -> None:
        """Abort the request at the next step's `apply_aborts`; unknown (or finished) ids are ignored."""
        if request_id in self._ids:
            self._aborts.add(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._ids)

    # -- from step() --------------------------------------------------------------------------------------------

    def apply_aborts(self, outputs: Outputs) -> None:
        """Finish the sequences aborted since the last step (ABORT), waiting ones first, then running ones."""
        if not self._aborts:
            return
        aborts, self._aborts = self._aborts, set()
        for seq in [*self.waiting, *self.running]:
            if seq.request_id in aborts and seq.finish is None:
                self.finish(seq, FinishReason.ABORT, outputs)

    def admit(self, reserve: Callable[[S, list[S]], bool]) -> list[S]:
        """Move waiting sequences to `running`, oldest first, while fewer than `max_num_seqs` run and `reserve(seq,
        taken)` accepts the next one (`taken`: those admitted by this call so far): the engine says whether its
        cache has room for it and, if so, reserves it. The first one refused stops admission (no request overtakes
        another). Returns those admitted, in order."""
        taken: list[S] = []
        while self.waiting and len(self.running) < self.max_num_seqs and reserve(self.waiting[0], taken):
            seq = self.waiting.popleft()
            self.running.append(seq)
            taken.append(seq)
        return taken

    def advance(self, seq: S, token: int, outputs: Outputs, logprob: TokenLogprob | None = None) -> bool:
        """Record the token sampled for `seq` (and its log probability, if asked) and emit it; True when the
        sequence finished with it: on a stop id (not recorded, not emitted: STOP), at max_new_tokens or a full
        context (LENGTH), or when its constraint is complete (STOP) or refuses the token (ERROR, not emitted)."""
        if token in seq.stop_ids:
            self.finish(seq, FinishReason.STOP, outputs)
            return True
        seq.num_generated += 1
        seq.tokens.append(token)
        logprobs = [logprob] if logprob is not None else None
        reason = self._finish_after(seq, token)
        if reason is FinishReason.ERROR:
            self.finish(seq, reason, outputs, error=CONSTRAINT_REFUSED)
        elif reason is not None:
            self.finish(seq, reason, outputs, [token], logprobs=logprobs)
        else:
            outputs.emit(seq, [token], logprobs=logprobs)
        return reason is not None

    def _finish_after(self, seq: S, token: int) -> FinishReason | None:
        """Why `seq` ends with `token`, just recorded (not a stop id): ERROR when its constraint refuses the token,
        STOP when the constraint is complete with it, LENGTH at max_new_tokens or a full context; None: it goes on.
        The constraint, if any, consumes the token."""
        constraint = seq.params.constraint
        if constraint is not None:
            if not constraint.advance(token):
                return FinishReason.ERROR
            if constraint.finished:
                return FinishReason.STOP
        if seq.num_generated >= seq.params.max_new_tokens or len(seq.tokens) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish(
        self,
        seq: S,
        reason: FinishReason,
        outputs: Outputs,
        tokens: list[int] | None = None,
        *,
        error: str | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        """End `seq` with its final output; it stays in its list until `drop_finished`."""
        seq.finish = reason
        self._ids.discard(seq.request_id)
        outputs.emit(seq, tokens or [], reason, error, logprobs)

    def fail(self, seqs: list[S], error: str, outputs: Outputs) -> None:
        """End each of `seqs` with ERROR and `error` (a failed forward pass fails its batch, not the engine)."""
        for seq in seqs:
            self.finish(seq, FinishReason.ERROR, outputs, error=error)

    def preempt(self, seq: S) -> None:
        """Send a running sequence back to the front of the queue, to be admitted again (and its tokens computed
        again) when there is room; the engine has freed what it held in the cache."""
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def drop_finished(self) -> list[S]:
        """Take the finished sequences out of `waiting` and `running` (waiting ones first, each list in order) and
        return them, for the engine to free what they held."""
        gone = [s for s in self.waiting if s.finish is not None] + [s for s in self.running if s.finish is not None]
        if gone:
            self.waiting = deque(s for s in self.waiting if s.finish is None)
            self.running = [s for s in self.running if s.finish is None]
        return gone

    def clear(self) -> list[S]:
        """Drop every sequence without an output (the engine is closing); returns them, for the engine to free."""
        seqs = [*self.running, *self.waiting]
        self.running, self.waiting = [], deque()
        self._ids.clear()
        self._aborts.clear()
        return seqs

    def stats(self, *, tokens_in_flight: int, kv_capacity: int | None) -> EngineStats:
        """`EngineStats` with the engine's view of its cache."""
        return EngineStats(
            running=len(self.running),
            waiting=len(self.waiting),
            tokens_in_flight=tokens_in_flight,
            kv_capacity=kv_capacity,
            prefill_tokens=self.prefilled,
            decode_tokens=self.decoded,
            preemptions=self.preemptions,
        )
