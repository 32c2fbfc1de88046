"""The bookkeeping both engines share (lmfleet.engine.sequences), without a model: what finishes a sequence and how,
what a step's outputs hold, admission order, aborts and preemption."""

from __future__ import annotations

import pytest

from lmfleet.engine.base import EngineRejected, EngineRequest, FinishReason, SamplingParams, TokenLogprob
from lmfleet.engine.sequences import CONSTRAINT_REFUSED, Outputs, Seq, Sequences

EOS = 2


def book(max_num_seqs: int = 4, max_model_len: int = 32) -> Sequences[Seq]:
    return Sequences[Seq](max_num_seqs=max_num_seqs, max_model_len=max_model_len, vocab_size=100, eos_token_ids=(EOS,))


def add(seqs: Sequences[Seq], rid: str, prompt: list[int] | None = None, **params) -> Seq:
    return seqs.add(EngineRequest(rid, prompt or [5, 6, 7], SamplingParams(**params)), Seq)


def running(seqs: Sequences[Seq], *rids: str, **params) -> list[Seq]:
    added = [add(seqs, rid, **params) for rid in rids]
    assert seqs.admit(lambda seq, taken: True) == added
    return added


class Grammar:
    """A constraint that refuses `refused` and is complete after `length` tokens."""

    def __init__(self, length: int, refused: int = -1) -> None:
        self.length, self.refused, self.seen = length, refused, 0

    def allowed(self) -> bytes:
        return b"\xff" * 16

    def advance(self, token_id: int) -> bool:
        self.seen += 1
        return token_id != self.refused

    @property
    def finished(self) -> bool:
        return self.seen >= self.length


def test_a_step_gives_one_output_per_request_with_every_token_it_advanced():
    seqs = book()
    a, b = running(seqs, "a", "b", max_new_tokens=4)
    out = Outputs()
    assert [seqs.advance(a, t, out) for t in (10, 11, 12)] == [False, False, False]  # several tokens, one step
    assert seqs.advance(b, 20, out) is False
    assert seqs.advance(a, 13, out) is True  # max_new_tokens
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in out.list()] == [
        ("a", [10, 11, 12, 13], FinishReason.LENGTH),
        ("b", [20], None),
    ]
    assert a.tokens == [5, 6, 7, 10, 11, 12, 13] and a.num_generated == 4


def test_what_finishes_a_sequence():
    seqs = book(max_num_seqs=8)
    stop, full = running(seqs, "stop", "full", stop_token_ids=(9,), max_new_tokens=2)
    (done,) = running(seqs, "done", constraint=Grammar(length=1))
    (refused,) = running(seqs, "refused", constraint=Grammar(length=9, refused=10))
    out = Outputs()
    assert seqs.advance(stop, 9, out, TokenLogprob(9, -0.5)) is True  # a stop id is never returned
    assert seqs.advance(full, 10, out) is False and seqs.advance(full, 11, out) is True  # max_new_tokens
    assert seqs.advance(done, 10, out) is True  # the grammar is complete
    assert seqs.advance(refused, 10, out) is True  # the grammar refuses it
    finals = {o.request_id: (o.new_token_ids, o.finish_reason, o.error, o.logprobs) for o in out.list()}
    assert finals == {
        "stop": ([], FinishReason.STOP, None, None),
        "full": ([10, 11], FinishReason.LENGTH, None, None),
        "done": ([10], FinishReason.STOP, None, None),
        "refused": ([], FinishReason.ERROR, CONSTRAINT_REFUSED, None),
    }
    (eos,) = running(seqs, "eos")
    assert seqs.advance(eos, EOS, out) is True and out.list()[-1].finish_reason is FinishReason.STOP
    assert not seqs.has_unfinished()
    assert seqs.drop_finished() == [stop, full, done, refused, eos] and seqs.running == []


def test_ignore_eos_makes_end_of_sequence_an_ordinary_token_with_its_logprob():
    seqs = book()
    (seq,) = running(seqs, "a", ignore_eos=True, logprobs=0)
    out = Outputs()
    lp = TokenLogprob(EOS, -0.1)
    assert seqs.advance(seq, EOS, out, lp) is False
    assert [(o.new_token_ids, o.logprobs) for o in out.list()] == [([EOS], [lp])]


def test_prompt_logprobs_come_once_on_the_first_output_after_they_are_gathered():
    seqs = book()
    (seq,) = running(seqs, "a", prompt_logprobs=1)
    assert seq.echoing and seq.prompt_logprobs == [None]
    out = Outputs()
    seqs.advance(seq, 10, out)  # not gathered yet (a chunked prompt): nothing
    seq.prompt_logprobs = [None, TokenLogprob(6, -1.0), TokenLogprob(7, -2.0)]
    assert not seq.echoing
    later = Outputs()
    seqs.advance(seq, 11, later)
    seqs.advance(seq, 12, Outputs())
    assert out.list()[0].prompt_logprobs is None
    assert later.list()[0].prompt_logprobs == [None, TokenLogprob(6, -1.0), TokenLogprob(7, -2.0)]
    assert seq.prompt_logprobs is None


def test_admission_is_first_in_first_out_up_to_max_num_seqs():
    seqs = book(max_num_seqs=3)
    a, b, c, d = (add(seqs, rid) for rid in "abcd")
    seen: list[tuple[str, list[str]]] = []

    def reserve(seq: Seq, taken: list[Seq]) -> bool:
        seen.append((seq.request_id, [s.request_id for s in taken]))
        return seq is not b

    assert seqs.admit(reserve) == [a]  # b is refused: c does not overtake it
    assert seen == [("a", []), ("b", ["a"])]
    assert seqs.admit(lambda seq, taken: True) == [b, c]  # three running: d waits
    assert list(seqs.waiting) == [d]
    seqs.preempt(c)  # back to the front of the queue
    assert list(seqs.waiting) == [c, d] and seqs.running == [a, b]
    assert seqs.admit(lambda seq, taken: True) == [c]
    stats = seqs.stats(tokens_in_flight=7, kv_capacity=None)
    assert (stats.running, stats.waiting, stats.tokens_in_flight, stats.preemptions) == (3, 1, 7, 1)


def test_aborts_end_waiting_and_running_sequences_at_the_next_step():
    seqs = book(max_num_seqs=1)
    (run,) = running(seqs, "run")
    wait = add(seqs, "wait")
    for rid in ("wait", "run", "nope"):
        seqs.abort(rid)
    assert seqs.has_unfinished()  # until the step applies them
    out = Outputs()
    seqs.apply_aborts(out)
    assert [(o.request_id, o.finish_reason, o.new_token_ids) for o in out.list()] == [
        ("wait", FinishReason.ABORT, []),
        ("run", FinishReason.ABORT, []),
    ]
    assert seqs.drop_finished() == [wait, run] and not seqs.has_unfinished()
    seqs.abort("run")  # finished: ignored
    again = Outputs()
    seqs.apply_aborts(again)
    assert again.list() == []
    add(seqs, "run")  # the id is free again


def test_add_asserts_what_the_worker_checked_and_refuses_what_no_engine_runs():
    seqs = book(max_model_len=32)
    with pytest.raises(EngineRejected):
        add(seqs, "a", top_p=0.0)
    for prompt, params in (([5] * 30, dict(max_new_tokens=3)), ([100], {}), ([5], dict(max_new_tokens=0))):
        with pytest.raises(AssertionError):
            add(seqs, "b", prompt, **params)
    seq = add(seqs, "c", stop_token_ids=(9,))
    assert seq.stop_ids == {9, EOS} and add(seqs, "d", ignore_eos=True).stop_ids == frozenset()
    with pytest.raises(AssertionError):
        add(seqs, "c")  # ids are unique while in flight
    assert [s.request_id for s in seqs.waiting] == ["c", "d"]
