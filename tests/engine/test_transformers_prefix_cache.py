"""The transformers engine's prefix cache on the real tiny LLaMA in float32, driven through step(): a request that
shares leading tokens with earlier ones reuses their K/V, reports them as cached, and generates what it generates
with the cache off."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmfleet.engine.base import EngineOutput, EngineRequest, FinishReason, SamplingParams  # noqa: E402
from lmfleet.engine.transformers.engine import TransformersEngine  # noqa: E402
from lmfleet.engine.transformers.prefix import MIN_REUSE  # noqa: E402
from tests.engine.stepping import drive  # noqa: E402

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_models):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_models["alpha"], dtype=torch.float32)


@pytest.fixture(scope="module", params=["alpha", "beta"])
def each_model(request, tiny_models):
    """Both tiny models (different weights), in float32."""
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_models[request.param], dtype=torch.float32)


def req(rid: str, prompt: list[int], **params) -> EngineRequest:
    return EngineRequest(rid, list(prompt), SamplingParams(**params))


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


def token_bytes(model) -> int:
    """The K/V bytes of one token: keys and values of every layer, in float32."""
    c = model.config
    return c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4


@dataclass
class Run:
    outs: dict[str, list[EngineOutput]] = field(default_factory=dict)

    @property
    def tokens(self) -> dict[str, list[int]]:
        return {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in self.outs.items()}

    @property
    def firsts(self) -> dict[str, EngineOutput]:
        return {rid: outs[0] for rid, outs in self.outs.items()}


def run(engine: TransformersEngine, *requests: EngineRequest, join_at: list[int] | None = None) -> Run:
    """Add each request at its step (all at once by default) and step until the engine is idle."""
    pending = sorted(zip(join_at or [0] * len(requests), range(len(requests)), strict=True))
    done = Run()
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            engine.add_request(requests[pending.pop(0)[1]])
        for out in engine.step():
            done.outs.setdefault(out.request_id, []).append(out)
        step += 1
    return done


def cold(model, request: EngineRequest) -> list[int]:
    return drive(TransformersEngine(model, prefix_cache=False), [request])[0][request.request_id]


def test_a_shared_prefix_is_reused_and_generates_what_a_cold_run_does(model):
    system = tokens(40, 1)
    first = req("a", system + tokens(8, 2), max_new_tokens=10, **GREEDY)
    second = req("b", system + tokens(12, 3), max_new_tokens=10, **GREEDY)
    engine = TransformersEngine(model)
    assert run(engine, first).firsts["a"].cached_tokens == 0
    done = run(engine, second)
    assert done.firsts["b"].cached_tokens == 40
    assert done.tokens["b"] == cold(model, second) and done.outs["b"][-1].finish_reason == FinishReason.LENGTH
    stats = engine.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (48 + 52, 40)
    assert stats.prefill_tokens == 48 + 52 - 40  # cached tokens are not computed
    # the same prompt again: everything but its last token (whose logits it needs) comes from the cache
    again = run(engine, req("c", second.prompt_token_ids, max_new_tokens=10, **GREEDY))
    assert again.firsts["c"].cached_tokens == 51 and again.tokens["c"] == done.tokens["b"]
    assert [o.cached_tokens for o in again.outs["c"][1:]] == [None] * 9  # on the first output only


def test_cache_off_reports_nothing_cached(model):
    prompt = tokens(40, 4)
    engine = TransformersEngine(model, prefix_cache=False)
    for rid in ("a", "b"):
        assert run(engine, req(rid, prompt, max_new_tokens=3, **GREEDY)).firsts[rid].cached_tokens == 0
    stats = engine.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.prefix_cache_host_bytes) == (0, 0, 0)
    assert stats.prefill_tokens == 80


def test_hits_and_misses_prefilled_together_generate_what_cold_runs_do(each_model):
    """One prefill mixing rows with cached prefixes of different lengths and rows without any, joining a running
    batch: every row's greedy tokens are those of a cold run."""
    model = each_model
    base = tokens(60, 5)
    engine = TransformersEngine(model, max_num_seqs=8, max_batch_tokens=512)
    run(engine, req("seed", base, max_new_tokens=2, **GREEDY))
    prompts = {
        "long": base[:50] + tokens(3, 6),
        "short": base[:MIN_REUSE] + tokens(30, 7),
        "miss": tokens(25, 8),
        "all": base + tokens(1, 9),
        "tiny": tokens(2, 10),
    }
    requests = [req(rid, p, max_new_tokens=12, **GREEDY) for rid, p in prompts.items()]
    busy = req("busy", tokens(20, 11), max_new_tokens=30, **GREEDY)
    done = run(engine, busy, *requests, join_at=[0] + [3] * len(requests))
    cached = {rid: done.firsts[rid].cached_tokens for rid in prompts}
    assert cached == {"long": 50, "short": MIN_REUSE, "miss": 0, "all": 60, "tiny": 0}
    assert {rid: done.tokens[rid] for rid in prompts} == {r.request_id: cold(model, r) for r in requests}


def test_a_prefix_shorter_than_worth_reusing_is_computed(model):
    base = tokens(40, 12)
    engine = TransformersEngine(model)
    run(engine, req("a", base, max_new_tokens=2, **GREEDY))
    done = run(engine, req("b", base[: MIN_REUSE - 1] + tokens(20, 13), max_new_tokens=2, **GREEDY))
    assert done.firsts["b"].cached_tokens == 0


def test_conversations_over_one_system_prompt(model):
    """Two conversations over one system prompt: the second reuses it; each conversation's entry holds it (entries
    are kept whole: lmfleet.engine.transformers.prefix); a conversation's next turn reuses the whole conversation so
    far, and its entry replaces the conversation's previous one."""
    per_token = token_bytes(model)
    system = tokens(48, 14)
    engine = TransformersEngine(model)
    turn1 = {c: req(f"{c}1", system + tokens(10, 15 + i), max_new_tokens=6, **GREEDY) for i, c in enumerate("xy")}
    answer = run(engine, turn1["x"]).tokens["x1"]
    assert run(engine, turn1["y"]).firsts["y1"].cached_tokens == 48
    # held: each conversation whole (its last sampled token was never computed)
    assert engine.stats().prefix_cache_host_bytes == 2 * (48 + 10 + 6 - 1) * per_token
    turn2 = req("x2", turn1["x"].prompt_token_ids + answer + tokens(7, 17), max_new_tokens=6, **GREEDY)
    done = run(engine, turn2)
    assert done.firsts["x2"].cached_tokens == 48 + 10 + 6 - 1
    assert done.tokens["x2"] == cold(model, turn2)
    assert engine.stats().prefix_cache_host_bytes == ((48 + 10 + 6 - 1) + (48 + 10 + 6 + 7 + 6 - 1)) * per_token


def test_least_recently_used_prefixes_give_their_room_up(model):
    per_token = token_bytes(model)
    a, b, c = tokens(40, 18), tokens(40, 19), tokens(40, 20)
    # room for two prompts of 40 tokens (a request that ends on its first token keeps its prompt only)
    engine = TransformersEngine(model, prefix_cache_host_bytes=80 * per_token)
    for rid, p in (("a", a), ("b", b)):
        run(engine, req(rid, p, max_new_tokens=1, **GREEDY))
    assert engine.stats().prefix_cache_host_bytes == 80 * per_token
    assert run(engine, req("a2", a, max_new_tokens=1, **GREEDY)).firsts["a2"].cached_tokens == 39  # b is oldest now
    run(engine, req("c", c, max_new_tokens=1, **GREEDY))  # no room for c without giving b up
    assert engine.stats().prefix_cache_host_bytes == 80 * per_token
    again = (("a3", a), ("c2", c), ("b2", b))
    hits = {rid: run(engine, req(rid, p, max_new_tokens=1, **GREEDY)).firsts[rid].cached_tokens for rid, p in again}
    assert hits == {"a3": 39, "c2": 39, "b2": 0}


def test_a_prefix_larger_than_the_budget_is_not_kept(model):
    engine = TransformersEngine(model, prefix_cache_host_bytes=10 * token_bytes(model))
    prompt = tokens(40, 21)
    for rid in ("a", "b"):
        assert run(engine, req(rid, prompt, max_new_tokens=2, **GREEDY)).firsts[rid].cached_tokens == 0
    assert engine.stats().prefix_cache_host_bytes <= 10 * token_bytes(model)


def logprobs_of(outs: list[EngineOutput]) -> list:
    return [e for o in outs for e in (o.logprobs or [])]


def test_echo_computes_its_whole_prompt_and_logprobs_match_a_cold_run(model):
    prompt = tokens(40, 22)
    asking = dict(max_new_tokens=5, logprobs=3, **GREEDY)
    engine, reference = TransformersEngine(model), TransformersEngine(model, prefix_cache=False)
    run(engine, req("warm", prompt, max_new_tokens=3, **GREEDY))
    # echo: the whole prompt computed (no reuse), its log probabilities those of a cold run
    echo = req("e", prompt, prompt_logprobs=2, **asking)
    warm, cold_run = run(engine, echo), run(reference, echo)
    assert warm.firsts["e"].cached_tokens == 0
    assert warm.firsts["e"].prompt_logprobs == cold_run.firsts["e"].prompt_logprobs
    assert logprobs_of(warm.outs["e"]) == logprobs_of(cold_run.outs["e"])
    # only its tokens' logprobs: the prefix is reused; the same tokens, the values equal to rounding
    warm, cold_run = run(engine, req("t", prompt, **asking)), run(reference, req("t", prompt, **asking))
    assert warm.firsts["t"].cached_tokens == 39 and warm.tokens == cold_run.tokens
    for w, c in zip(logprobs_of(warm.outs["t"]), logprobs_of(cold_run.outs["t"]), strict=True):
        assert w.token_id == c.token_id and w.logprob == pytest.approx(c.logprob, abs=1e-4)
        assert [i for i, _ in w.top] == [i for i, _ in c.top]


def test_a_resumed_request_continues_from_its_cached_tokens(model):
    """Mid-stream resume: the worker sends the prompt and what was streamed before; an aborted request's tokens
    were kept, so the resume computes almost nothing and continues as the uninterrupted run does."""
    prompt = tokens(30, 23)
    whole = cold(model, req("w", prompt, max_new_tokens=20, **GREEDY))
    engine = TransformersEngine(model)
    engine.add_request(req("a", prompt, max_new_tokens=20, **GREEDY))
    streamed: list[int] = []
    for _ in range(8):
        streamed += [t for o in engine.step() for t in o.new_token_ids]
    engine.abort_request("a")
    run(engine)
    assert streamed == whole[: len(streamed)]
    resumed = run(engine, req("r", prompt + streamed, max_new_tokens=20 - len(streamed), **GREEDY))
    assert resumed.firsts["r"].cached_tokens == len(prompt) + len(streamed) - 1
    assert streamed + resumed.tokens["r"] == whole


def test_the_loader_passes_the_settings(tiny_models):
    from lmfleet.engine import registry
    from lmfleet.engine.transformers import TransformersSettings

    source = registry.locate(str(tiny_models["alpha"]))
    for settings, budget, shown in (
        (TransformersSettings(device="cpu", prefix_cache_host_bytes=3_000_000), 3_000_000, "prefix_cache=3MB host"),
        (TransformersSettings(device="cpu", prefix_cache=False), None, "prefix_cache=off"),
    ):
        loaded = registry.load(source, registry.choose(source), settings)
        assert loaded.engine.prefix_cache_budget == budget and shown in loaded.description
    assert TransformersEngine(loaded.engine.model).prefix_cache_budget > 0  # None: sized from the machine


def test_a_constrained_request_reuses_a_prefix(tiny_models, model):
    pytest.importorskip("llguidance")
    from lmfleet.engine.grammar import Grammars
    from lmfleet.engine.transformers.tokenizer import HFTokenizer

    engine = TransformersEngine(model)
    tokenizer = HFTokenizer.load(str(tiny_models["alpha"]), eos_token_ids=engine.eos_token_ids)
    grammars = Grammars(tokenizer)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    prompt = tokenizer.render_chat([{"role": "user", "content": "A number as JSON, please."}])

    def ask(rid: str) -> EngineRequest:
        constraint = grammars.constraint(grammars.json_schema(schema))
        return EngineRequest(rid, prompt, SamplingParams(max_new_tokens=60, temperature=0.0, constraint=constraint))

    first, second = run(engine, ask("a")), run(engine, ask("b"))  # the first runs cold
    assert (first.firsts["a"].cached_tokens, second.firsts["b"].cached_tokens) == (0, len(prompt) - 1)
    assert second.tokens["b"] == first.tokens["a"] and second.outs["b"][-1].finish_reason == FinishReason.STOP
    assert isinstance(json.loads(tokenizer.decode(second.tokens["b"]))["n"], int)
