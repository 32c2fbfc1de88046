"""Speculative decoding: the engine-independent parts (n-gram lookup, draft lengths, the verification rule keeping the
target's distribution) and the llama.cpp engine speculating on the real SmolLM2-135M GGUF, with n-gram lookup and
with a draft model (SmolLM2 drafting for itself: the same vocabulary, drafts it mostly accepts). What a user relies
on: greedy output token for token as without speculation, with logprobs, grammars, stop ids and aborts landing on
speculated tokens, and seeded sampling as reproducible as without it.

llama.cpp's CPU kernels are not batch-invariant (tests/engine/test_llamacpp_engine.py): a verified position is
computed in a batch of 1 + k tokens of its row where it would be computed alone, which moves its log probabilities a
little (up to about 0.1 on SmolLM2) and can flip a greedy near-tie, as a batch companion can. A poem about the sea
flipped at its 5th token (two candidates 0.02 apart); the answers here (repeated code, a capital, JSON) have no such
near-tie."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest

from lmfleet.engine.base import EngineRequest, FinishReason, SamplingParams
from lmfleet.engine.speculative import Acceptance, SpecPolicy, SpecSettings, draft_length, ngram_draft, verify
from tests.engine.stepping import drive

CODE = "def add(a, b):\n    return a + b\n\ndef mul(a, b):\n    return a * b\n\ndef sub(a, b):\n    return a - b\n"
EDIT = f"Rename the functions to plus, times and minus. Reply with the whole code only.\n\n{CODE}"
# one thread: a test machine shared with other work slows llama.cpp's thread barriers down many times over
EXACT = dict(flash_attn=False, prefix_cache=False, max_model_len=1024, max_num_seqs=4, n_threads=1)
FREE = dict(verify_cost=0.0)  # every row drafts all it may, whatever the machine's timings (SpecPolicy)

# -- the engine-independent parts ---------------------------------------------------------------------------------


def test_ngram_lookup_takes_the_latest_longest_match() -> None:
    #         0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3]
    assert ngram_draft(tokens, 4, ngram_max=3) == [5, 6, 2, 3]  # "2 3" last seen at 5-6; no earlier "6 2 3"
    assert ngram_draft([*tokens[:-1], 7, 1, 2, 3], 2, ngram_max=3) == [4, 9]  # the trigram "1 2 3" beats bigrams
    assert ngram_draft(tokens, 2, ngram_max=1) == [5, 6]  # unigram "3": its latest earlier occurrence is at 6
    assert ngram_draft(tokens, 2, ngram_max=3, ngram_min=3) == []  # no earlier "6 2 3", only bigrams
    assert ngram_draft([5, 5, 5], 4, ngram_max=3) == [5]  # a repeating run proposes what followed, up to the end
    assert ngram_draft([1, 2, 3], 4, 3) == [] and ngram_draft([1], 4, 3) == [] and ngram_draft(tokens, 0, 3) == []


def test_draft_lengths_leave_room_for_the_targets_own_token() -> None:
    spec = SpecSettings(type="ngram", draft_max=8, draft_min=2)
    assert draft_length(spec, tokens=100, generated=0, max_new_tokens=64, max_model_len=1000) == 8
    assert draft_length(spec, tokens=100, generated=60, max_new_tokens=64, max_model_len=1000) == 3
    assert draft_length(spec, tokens=100, generated=62, max_new_tokens=64, max_model_len=1000) == 0  # below min
    assert draft_length(spec, tokens=996, generated=0, max_new_tokens=64, max_model_len=1000) == 3


def test_the_policy_drafts_what_pays_for_its_cost() -> None:
    free = SpecPolicy(SpecSettings(type="ngram", verify_cost=0.0))
    assert free.draft_length(Acceptance(), 8, rows=1) == 8  # verifying costs nothing: draft all it may
    full = SpecPolicy(SpecSettings(type="ngram", verify_cost=1.0))
    assert full.draft_length(Acceptance(asked=10, accepted=9), 8, rows=1) == 0  # a token costs a whole decode
    measured = SpecPolicy(SpecSettings(type="ngram"))
    fresh, rejecting, good = Acceptance(), Acceptance(), Acceptance(asked=10, accepted=8)
    assert measured.draft_length(fresh, 8, rows=1) == 0  # a plain step is timed first
    measured.timed(1, 0.010)
    assert measured.draft_length(fresh, 8, rows=1) > 0  # untimed sizes and a new row: the optimistic priors try it
    for _ in range(6):
        measured.verified(rejecting, drafted=4, accepted=0)
    assert measured.draft_length(rejecting, 8, rows=1) == 0  # this row's drafts keep failing
    for n in range(2, 10):
        measured.timed(n, 0.010 * n)  # a token costs as much in a batch as alone: a CPU at its compute limit
    assert measured.draft_length(good, 8, rows=1) == 0
    for n in range(1, 13):
        for _ in range(20):
            measured.timed(n, 0.010 + 0.001 * n)  # nearly free once the weights are read: a memory-bound decode
    assert measured.draft_length(good, 8, rows=1) >= 4
    assert measured.draft_length(good, 8, rows=4) >= 1


@pytest.mark.parametrize(
    "kw",
    [
        dict(type="eagle"),
        dict(type="draft"),
        dict(type="ngram", draft_model="x.gguf"),
        dict(draft_min=0),
        dict(ngram_min=4, ngram_max=3),
    ],
)
def test_settings_refuse_what_cannot_run(kw) -> None:
    with pytest.raises(ValueError):
        SpecSettings(**kw)


def test_verification_stops_at_the_first_mismatch_and_takes_a_bonus_after_a_full_match() -> None:
    def target(tokens: list[int], finish_at: int = -1):
        seen: list[int] = []

        def sample(i: int) -> tuple[int, bool]:
            seen.append(tokens[i])
            return tokens[i], i == finish_at

        return sample, seen

    sample, seen = target([5, 6, 0, 0])
    assert verify([5, 7, 8], sample) == 1 and seen == [5, 6]  # the target's own 6 replaces the draft's 7
    sample, seen = target([5, 7, 8, 9])
    assert verify([5, 7, 8], sample) == 3 and seen == [5, 7, 8, 9]  # all accepted and a bonus token
    sample, seen = target([5, 7, 8, 9], finish_at=1)
    assert verify([5, 7, 8], sample) == 1 and seen == [5, 7]  # the request finished: nothing more is sampled


def test_verification_keeps_the_targets_distribution() -> None:
    """Speculative sampling with a deterministic draft (q one-hot): the emitted tokens follow the target's
    distribution at every position whatever the draft proposes. A fixed seed makes the statistics deterministic."""
    p = [np.array([0.5, 0.3, 0.15, 0.05]), np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.25, 0.25, 0.25, 0.25])]
    rng = np.random.default_rng(20)
    runs = 40_000
    first: Counter[int] = Counter()
    second: Counter[int] = Counter()  # the token after an accepted first draft
    accepted: Counter[int] = Counter()

    def sampler(out: list[int]):
        def sample(i: int) -> tuple[int, bool]:
            out.append(int(rng.choice(4, p=p[i])))
            return out[-1], False

        return sample

    for _ in range(runs):
        out: list[int] = []
        accepted[verify([1, 3], sampler(out))] += 1
        first[out[0]] += 1
        if out[0] == 1:
            second[out[1]] += 1
    assert np.allclose([first[t] / runs for t in range(4)], p[0], atol=0.01)
    n = sum(second.values())
    assert np.allclose([second[t] / n for t in range(4)], p[1], atol=0.015)
    # the acceptance rates are the target's probabilities of the drafted tokens
    assert accepted[0] / runs == pytest.approx(1 - 0.3, abs=0.01)
    assert accepted[2] / runs == pytest.approx(0.3 * 0.4, abs=0.01)


# -- the llama.cpp engine ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(smollm2_gguf) -> Iterator[dict]:
    """The same model without speculation, with n-gram lookup and with itself as the draft model."""
    pytest.importorskip("llama_cpp")
    from lmfleet.engine.llamacpp.engine import LlamaCppEngine
    from lmfleet.engine.llamacpp.tokenizer import GGUFTokenizer

    path = str(smollm2_gguf)
    built = {
        "none": LlamaCppEngine(path, **EXACT),
        "ngram": LlamaCppEngine(path, speculative=SpecSettings(type="ngram", **FREE), **EXACT),
        "draft": LlamaCppEngine(path, speculative=SpecSettings(type="draft", draft_model=path, **FREE), **EXACT),
    }
    built["tokenizer"] = GGUFTokenizer(built["none"].model)
    yield built
    for name in ("none", "ngram", "draft"):
        built[name].close()


@pytest.fixture(scope="module")
def prompts(engines) -> dict[str, list[int]]:
    tok = engines["tokenizer"]
    return {
        "edit": tok.render_chat([{"role": "user", "content": EDIT}]),
        "chat": tok.render_chat(
            [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"},
            ]
        ),
    }


def greedy(rid: str, prompt: list[int], **kw) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingParams(**{"max_new_tokens": 48, "temperature": 0.0, **kw}))


def counters(engine) -> tuple[int, int]:
    stats = engine.stats()
    return stats.spec_draft_tokens, stats.spec_accepted_tokens


def assert_idle(engine) -> None:
    assert not engine.has_unfinished_requests() and engine.stats().running == 0
    assert sorted(engine._free_ids) == list(range(engine.max_num_seqs))


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_greedy_output_of_concurrent_rows_is_that_without_speculation(engines, prompts, kind) -> None:
    def requests() -> list[EngineRequest]:
        return [
            greedy("edit", prompts["edit"]),
            greedy("chat", prompts["chat"]),
            greedy("edit-again", prompts["edit"], max_new_tokens=30),
        ]

    plain, plain_final = drive(engines["none"], requests())
    drafted, accepted = counters(engines[kind])
    spec, spec_final = drive(engines[kind], requests())
    assert spec == plain
    assert [o.finish_reason for o in spec_final.values()] == [o.finish_reason for o in plain_final.values()]
    new_drafted, new_accepted = counters(engines[kind])
    assert new_drafted > drafted and new_accepted > accepted  # it did speculate, and the drafts were used
    assert new_accepted - accepted <= new_drafted - drafted
    assert_idle(engines[kind])


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_every_speculated_token_has_its_logprob(engines, prompts, kind) -> None:
    def run(engine) -> list:
        engine.add_request(greedy("lp", prompts["edit"], logprobs=3))
        found = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.new_token_ids:  # (a stop id ends it with an output of none)
                    assert out.logprobs is not None and len(out.logprobs) == len(out.new_token_ids)
                    found += out.logprobs
        return found

    plain, spec = run(engines["none"]), run(engines[kind])
    assert [lp.token_id for lp in spec] == [lp.token_id for lp in plain]
    # each from its own position's logits (another position's would be off by whole units), up to the batch drift
    assert [lp.logprob for lp in spec] == pytest.approx([lp.logprob for lp in plain], abs=0.15)
    assert all(len(lp.top) == 3 and lp.top[0][0] == lp.token_id for lp in spec)  # greedy: the most likely


def test_a_grammar_holds_on_speculated_tokens(engines) -> None:
    pytest.importorskip("llguidance")
    from lmfleet.engine.grammar import Grammars

    tok = engines["tokenizer"]
    grammars = Grammars(tok)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "languages": {"type": "array", "maxItems": 4}},
        "required": ["name", "languages"],
        "additionalProperties": False,
    }
    record = '{"name": "Ada Lovelace", "languages": ["English", "French", "Latin"]}'
    prompt = tok.render_chat([{"role": "user", "content": f"Repeat this JSON exactly: {record}"}])

    def request() -> EngineRequest:
        constraint = grammars.constraint(grammars.json_schema(schema))
        return greedy("json", prompt, max_new_tokens=60, constraint=constraint)

    plain, _ = drive(engines["none"], [request()])
    drafted, _ = counters(engines["ngram"])
    spec, final = drive(engines["ngram"], [request()])
    assert final["json"].finish_reason == FinishReason.STOP
    assert spec == plain
    assert set(json.loads(tok.decode(spec["json"]))) == {"name", "languages"}
    assert counters(engines["ngram"])[0] > drafted


def test_a_stop_id_inside_a_draft_ends_the_request_there(engines, prompts) -> None:
    plain, _ = drive(engines["none"], [greedy("r", prompts["edit"])])
    tokens = plain["r"]
    stop = tokens[20]  # deep in the repeated code, where drafts are accepted
    cut = tokens[: tokens.index(stop)]
    for kind in ("ngram", "draft"):
        spec, final = drive(engines[kind], [greedy("r", prompts["edit"], stop_token_ids=(stop,))])
        assert spec["r"] == cut and final["r"].finish_reason == FinishReason.STOP
        assert_idle(engines[kind])


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_an_abort_mid_speculation_frees_the_sequence(engines, prompts, kind) -> None:
    engine = engines[kind]
    drafted, _ = counters(engine)
    engine.add_request(greedy("a", prompts["edit"], max_new_tokens=200))
    got: list[int] = []
    while counters(engine)[0] == drafted or len(got) < 8:
        for out in engine.step():
            got += out.new_token_ids
            assert not out.finished
    engine.abort_request("a")
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", FinishReason.ABORT)]
    assert_idle(engine)
    # the rejected drafts' cells are gone: the sequence id's next request is computed as on a fresh engine
    again, _ = drive(engine, [greedy("b", prompts["edit"])])
    plain, _ = drive(engines["none"], [greedy("b", prompts["edit"])])
    assert again == plain


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_seeded_sampling_is_reproducible(engines, prompts, kind) -> None:
    def request(seed: int) -> EngineRequest:
        params = SamplingParams(max_new_tokens=40, temperature=0.7, top_p=0.95, seed=seed, presence_penalty=0.2)
        return EngineRequest(f"s{seed}", prompts["edit"], params)

    first, _ = drive(engines[kind], [request(1), request(2)])
    second, _ = drive(engines[kind], [request(1), request(2)])
    assert first == second and first["s1"] != first["s2"]


def test_a_draft_model_of_another_vocabulary_is_refused(smollm2_gguf, qwen05_gguf) -> None:
    pytest.importorskip("llama_cpp")
    from lmfleet.engine.llamacpp.engine import LlamaCppEngine

    spec = SpecSettings(type="draft", draft_model=str(qwen05_gguf))
    with pytest.raises(ValueError, match="does not use the model's vocabulary"):
        LlamaCppEngine(str(smollm2_gguf), speculative=spec, max_model_len=256)


def test_no_row_speculates_above_the_running_limit(engines, prompts, smollm2_gguf) -> None:
    from lmfleet.engine.llamacpp.engine import LlamaCppEngine

    engine = LlamaCppEngine(str(smollm2_gguf), speculative=SpecSettings(type="ngram", max_running=1, **FREE), **EXACT)
    try:
        engine.add_request(greedy("a", prompts["edit"]))
        engine.add_request(greedy("b", prompts["edit"], max_new_tokens=24))
        both = 0
        while engine.has_unfinished_requests():
            drafted = counters(engine)[0]
            outs = engine.step()
            if len(outs) == 2:  # both ran this step: neither drafted
                both += 1
                assert counters(engine)[0] == drafted
        assert both >= 20 and counters(engine)[0] > 0  # "a" alone after "b" finished: it speculates again
    finally:
        engine.close()


@pytest.mark.qwen15
def test_qwen15_with_the_05b_drafting_gives_its_own_greedy_code_edit(qwen15_gguf, qwen05_gguf) -> None:
    pytest.importorskip("llama_cpp")
    from lmfleet.engine.llamacpp.engine import LlamaCppEngine
    from lmfleet.engine.llamacpp.tokenizer import GGUFTokenizer

    plain = LlamaCppEngine(str(qwen15_gguf), max_model_len=2048)
    spec = SpecSettings(type="draft", draft_model=str(qwen05_gguf), **FREE)
    drafted = LlamaCppEngine(str(qwen15_gguf), speculative=spec, max_model_len=2048)
    try:
        prompt = GGUFTokenizer(plain.model).render_chat([{"role": "user", "content": EDIT}])
        want, _ = drive(plain, [greedy("r", prompt, max_new_tokens=64)])
        got, _ = drive(drafted, [greedy("r", prompt, max_new_tokens=64)])
        assert got == want
        assert counters(drafted)[1] > 0
    finally:
        plain.close()
        drafted.close()
