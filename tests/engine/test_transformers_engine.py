"""TransformersEngine on the real tiny LLaMA, driven through step(): the serving invariants and the limits."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmfleet.engine.base import EngineOutput, EngineRejected, EngineRequest, FinishReason, Rejection, SamplingParams  # noqa: E402  # noqa: E402
from lmfleet.engine.transformers.engine import TransformersEngine  # noqa: E402
from tests.engine.stepping import drive  # noqa: E402

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    return tiny_models["alpha"]  # built once per session by make_test_model (tests/conftest.py)


@pytest.fixture(scope="module")
def model(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def req(rid: str, prompt: list[int], **params) -> EngineRequest:
    return EngineRequest(rid, list(prompt), SamplingParams(**params))


def prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 48) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1024) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def alone(model, request: EngineRequest, **kw) -> tuple[list[int], EngineOutput]:
    tokens, final = drive(TransformersEngine(model, **kw), [request])
    return tokens[request.request_id], final[request.request_id]


def test_greedy_alone_equals_generate(model):
    for i, prompt in enumerate(prompts(4, seed=1)):
        tokens, final = alone(model, req(str(i), prompt, max_new_tokens=24, temperature=0.0))
        ids = torch.tensor([prompt])
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)[
            0, len(prompt) :
        ].tolist()
        if final.finish_reason == FinishReason.STOP:  # generate keeps the eos token; the engine does not return it
            assert expected[-1] in model.generation_config.eos_token_id
            expected = expected[:-1]
        else:
            assert final.finish_reason == FinishReason.LENGTH
        assert tokens == expected


@pytest.mark.parametrize("max_num_seqs", [16, 5])
def test_greedy_batch_equals_alone(model, max_num_seqs):
    """16 prompts of different lengths joining at different steps (and, with 5 slots, queueing for a row)."""
    rng = random.Random(2)
    requests = [req(str(i), p, max_new_tokens=rng.randint(4, 40), **GREEDY) for i, p in enumerate(prompts(16, seed=2))]
    expected = {r.request_id: alone(model, r)[0] for r in requests}
    engine = TransformersEngine(model, max_num_seqs=max_num_seqs, max_batch_tokens=96)
    tokens, final = drive(engine, requests, [rng.randint(0, 30) for _ in requests])
    assert tokens == expected
    assert all(f.finish_reason == FinishReason.LENGTH for f in final.values())
    assert engine.stats().running == 0 and engine.stats().tokens_in_flight == 0


def test_seeded_sampling_is_independent_of_the_batch(model):
    rng = random.Random(3)
    sampling = [
        dict(temperature=1.0, seed=7),
        dict(temperature=0.8, top_p=0.9, seed=8),
        dict(temperature=1.3, top_k=20, seed=9),
        dict(temperature=0.7, top_k=50, top_p=0.8, presence_penalty=0.5, frequency_penalty=0.3, seed=10),
    ]
    requests = [
        req(f"s{i}", p, max_new_tokens=20, ignore_eos=True, **sampling[i % 4]) for i, p in enumerate(prompts(8, 3))
    ]
    # greedy companions with penalties keep the batch off the greedy fast path
    companions = [req(f"g{i}", p, max_new_tokens=30, **GREEDY) for i, p in enumerate(prompts(6, 4))]
    expected = {r.request_id: alone(model, r)[0] for r in requests}
    mixed = requests + companions
    tokens, _ = drive(TransformersEngine(model), mixed, [rng.randint(0, 10) for _ in mixed])
    assert {k: v for k, v in tokens.items() if k.startswith("s")} == expected
    # and sampling does sample: another seed gives another sequence
    other = alone(
        model, req("x", requests[0].prompt_token_ids, max_new_tokens=20, ignore_eos=True, temperature=1.0, seed=70)
    )[0]
    assert other != expected["s0"]


def test_unseeded_sampling_varies(model):
    prompt = prompts(1, 5)[0]
    runs = {
        tuple(alone(model, req("r", prompt, max_new_tokens=16, temperature=1.5, ignore_eos=True))[0]) for _ in range(3)
    }
    assert len(runs) > 1


def test_penalties_change_greedy_output(model):
    prompt = prompts(1, 6, lo=10, hi=10)[0]
    plain, _ = alone(model, req("a", prompt, max_new_tokens=40, **GREEDY))
    assert len(set(plain)) < len(plain)  # the random model repeats itself...
    penalized, _ = alone(model, req("b", prompt, max_new_tokens=40, frequency_penalty=1000.0, **GREEDY))
    assert len(set(penalized)) == len(penalized)  # ...and stops repeating under a huge frequency penalty
    presence, _ = alone(model, req("c", prompt, max_new_tokens=40, presence_penalty=1000.0, **GREEDY))
    assert len(set(presence)) == len(presence)


def test_max_new_tokens_finishes_with_length(model):
    tokens, final = alone(model, req("a", [5, 6, 7], max_new_tokens=7, **GREEDY))
    assert len(tokens) == 7 and final.finish_reason == FinishReason.LENGTH and final.new_token_ids
    tokens, final = alone(model, req("b", [5, 6, 7], max_new_tokens=1, **GREEDY))
    assert len(tokens) == 1 and final.finish_reason == FinishReason.LENGTH


def test_eos_and_stop_tokens_finish_with_stop_and_are_not_returned(model):
    prompt = prompts(1, 7)[0]
    reference, _ = alone(model, req("r", prompt, max_new_tokens=20, **GREEDY))
    k = next(i for i in range(3, 20) if reference[i] not in reference[:i])  # first occurrence of a token at step k
    stop = reference[k]
    tokens, final = alone(model, req("s", prompt, max_new_tokens=20, temperature=0.0, stop_token_ids=(stop,)))
    assert tokens == reference[:k] and final.finish_reason == FinishReason.STOP and stop not in final.new_token_ids
    # the same token as the model's end-of-sequence id
    tokens, final = alone(model, req("e", prompt, max_new_tokens=20, temperature=0.0), eos_token_ids=(stop,))
    assert tokens == reference[:k] and final.finish_reason == FinishReason.STOP
    # ignore_eos makes it an ordinary token
    tokens, final = alone(model, req("i", prompt, max_new_tokens=20, **GREEDY), eos_token_ids=(stop,))
    assert tokens == reference and final.finish_reason == FinishReason.LENGTH


def test_eos_ids_come_from_the_generation_config(model):
    engine = TransformersEngine(model)
    assert set(engine.eos_token_ids) == set(model.generation_config.eos_token_id)
    assert engine.max_model_len == model.config.max_position_embeddings


def test_abort_running_and_waiting(model):
    engine = TransformersEngine(model, max_num_seqs=2)
    for i, p in enumerate(prompts(3, 8)):
        engine.add_request(req(str(i), p, max_new_tokens=50, **GREEDY))
    engine.step()
    assert engine.stats().running == 2 and engine.stats().waiting == 1
    engine.abort_request("0")
    engine.abort_request("2")  # still waiting
    engine.abort_request("nope")  # unknown ids are ignored
    outs = {o.request_id: o for o in engine.step()}
    assert outs["0"].finish_reason == FinishReason.ABORT and outs["0"].new_token_ids == []
    assert outs["2"].finish_reason == FinishReason.ABORT
    assert outs["1"].finish_reason is None and len(outs["1"].new_token_ids) == 1
    assert engine.stats().running == 1 and engine.stats().waiting == 0
    engine.abort_request("1")
    assert [o.finish_reason for o in engine.step()] == [FinishReason.ABORT]
    assert not engine.has_unfinished_requests()
    assert engine.step() == []


def test_refuses_what_it_cannot_run_and_asserts_what_the_worker_checks(model):
    engine = TransformersEngine(model, max_model_len=64)
    with pytest.raises(EngineRejected) as info:
        engine.add_request(req("a", [5], top_p=0.0))
    assert info.value.reason is Rejection.UNSUPPORTED
    for unchecked in (req("b", [5] * 60, max_new_tokens=5), req("c", []), req("d", [5, 1024])):
        with pytest.raises(AssertionError):  # the worker refuses these before they reach an engine
            engine.add_request(unchecked)
    engine.add_request(req("e", [5]))
    assert engine.stats().waiting == 1
    with pytest.raises(ValueError):
        TransformersEngine(model, max_model_len=100_000)


def test_reaching_max_model_len_finishes_with_length(model):
    engine = TransformersEngine(model, max_model_len=32)
    tokens, final = drive(engine, [req("a", [5] * 20, max_new_tokens=12, **GREEDY)])
    assert len(tokens["a"]) == 12 and final["a"].finish_reason == FinishReason.LENGTH


def test_max_batch_tokens_bounds_prefill_but_a_long_prompt_still_runs(model):
    engine = TransformersEngine(model, max_batch_tokens=50)
    for i in range(4):
        engine.add_request(req(str(i), [7] * 20, max_new_tokens=3, **GREEDY))
    engine.step()
    assert engine.stats().running == 2 and engine.stats().waiting == 2  # 2 x 20 <= 50 < 3 x 20
    engine.add_request(req("long", [9] * 120, max_new_tokens=3, **GREEDY))
    tokens, final = drive(engine, [])
    assert final["long"].finish_reason == FinishReason.LENGTH and len(tokens["long"]) == 3


def test_stats_count_cached_tokens(model):
    engine = TransformersEngine(model)
    engine.add_request(req("a", [5] * 10, max_new_tokens=5, **GREEDY))
    engine.add_request(req("b", [6] * 4, max_new_tokens=2, **GREEDY))
    assert engine.stats().waiting == 2 and engine.stats().running == 0
    engine.step()  # prefill: prompts cached, first tokens sampled
    assert engine.stats().running == 2 and engine.stats().tokens_in_flight == 14
    assert (engine.stats().prefill_tokens, engine.stats().decode_tokens) == (14, 0)
    engine.step()  # one decode: b finishes (2 tokens), a caches one more
    stats = engine.stats()
    assert stats.running == 1 and stats.tokens_in_flight == 11
    assert (stats.prefill_tokens, stats.decode_tokens, stats.preemptions) == (14, 2, 0)
    assert stats.kv_capacity == engine.max_num_seqs * engine.max_model_len  # what the batch can grow to
    assert stats.kv_cache_usage == 11 / stats.kv_capacity


class _Flaky:
    """Delegates to a model; raises from forward while `fail` is set."""

    def __init__(self, model):
        self.model, self.fail = model, False

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        if self.fail:
            raise RuntimeError("boom")
        return self.model(*args, **kwargs)


def test_a_failed_forward_fails_its_requests_not_the_engine(model):
    flaky = _Flaky(model)
    engine = TransformersEngine(flaky)
    engine.add_request(req("a", [5, 6], max_new_tokens=10, **GREEDY))
    engine.step()
    flaky.fail = True
    engine.add_request(req("b", [5, 6], max_new_tokens=10, **GREEDY))
    outs = engine.step()
    assert {o.request_id: o.finish_reason for o in outs} == {"a": FinishReason.ERROR, "b": FinishReason.ERROR}
    assert all("boom" in (o.error or "") for o in outs)
    assert not engine.has_unfinished_requests()
    flaky.fail = False
    tokens, final = drive(engine, [req("c", [5, 6], max_new_tokens=4, **GREEDY)])
    assert final["c"].finish_reason == FinishReason.LENGTH and len(tokens["c"]) == 4


def test_the_loader_and_bfloat16(model_dir):
    from lmfleet.engine import registry
    from lmfleet.engine.transformers import TransformersSettings

    source = registry.locate(str(model_dir))
    settings = TransformersSettings(dtype="bfloat16", device="cpu", max_num_seqs=4)
    loaded = registry.load(source, registry.choose(source), settings)
    engine = loaded.engine
    assert loaded.engine_name == "transformers" and "dtype=bfloat16" in loaded.description
    assert "device=cpu" in loaded.description
    assert f"kv_cache=grows to {4 * engine.max_model_len} tokens" in loaded.description
    assert next(engine.model.parameters()).dtype == torch.bfloat16 and engine.max_num_seqs == 4
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("hello world", add_special_tokens=False)) == "hello world"
    requests = [req(str(i), p, max_new_tokens=6, temperature=0.9, seed=i) for i, p in enumerate(prompts(6, 9))]
    tokens, final = drive(engine, requests, [0, 0, 1, 2, 2, 5])
    assert all(f.finish_reason in (FinishReason.LENGTH, FinishReason.STOP) for f in final.values())
    assert all(len(t) <= 6 for t in tokens.values())


def test_the_raw_decode_baseline_decodes_what_the_engine_decodes(model):
    """`lmfleet bench --raw` is a fair ceiling only if it does the engine's work: the same greedy tokens."""
    from lmfleet.bench.raw import raw_decode

    run = raw_decode(model, 3, prompt_len=6, new_tokens=5, seed=3)
    assert run.tokens == 15 and run.seconds > 0
    requests = [req(str(i), p, max_new_tokens=5, **GREEDY) for i, p in enumerate(run.prompts)]
    tokens, _ = drive(TransformersEngine(model), requests)
    assert [tokens[str(i)] for i in range(3)] == run.token_ids


async def test_served_through_the_async_runner(model):
    """The real engine behind AsyncEngine: concurrent streams give the tokens a lone run gives; early close aborts."""
    import asyncio

    from lmfleet.engine.runner import AsyncEngine

    requests = [req(str(i), p, max_new_tokens=12 + i, **GREEDY) for i, p in enumerate(prompts(8, 11))]
    expected = {r.request_id: alone(model, r)[0] for r in requests}
    engine = TransformersEngine(model, max_num_seqs=4)
    runner = AsyncEngine(engine)
    runner.start()
    try:

        async def collect(r: EngineRequest) -> list[int]:
            outs = [o async for o in runner.generate(r)]
            assert outs[-1].finish_reason == FinishReason.LENGTH
            return [t for o in outs for t in o.new_token_ids]

        got = await asyncio.gather(*(collect(r) for r in requests))
        assert dict(zip(expected, got, strict=True)) == expected
        gen = runner.generate(req("long", [5, 6, 7], max_new_tokens=400, **GREEDY))
        await anext(gen)
        await gen.aclose()
        while runner.stats().running or runner.stats().waiting:
            await asyncio.sleep(0.01)
        assert runner.stats().tokens_in_flight == 0  # the aborted row was freed
    finally:
        await runner.stop()
