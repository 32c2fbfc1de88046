"""The llama.cpp engine's prefix cache on the real SmolLM2-135M GGUF: entries share their common leading cells, later
turns of a conversation start from the earlier ones, the cache gives its room up before a running request is
preempted, an entry pushed out to host memory comes back and gives the same tokens, and what works without the cache
(preemption, resume, log probabilities, echo) works with it.

Flash attention is off here (as in test_llamacpp_engine, the regime closest to batch-invariant), so a reuse's
arithmetic is the cold run's but for the one token it computes alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

import llama_cpp.llama_cpp as llama  # noqa: E402

from lmfleet.engine.base import EngineOutput, EngineRequest, FinishReason, SamplingParams  # noqa: E402
from lmfleet.engine.llamacpp.engine import LlamaCppEngine  # noqa: E402
from lmfleet.engine.llamacpp.tokenizer import GGUFTokenizer  # noqa: E402
from lmfleet.engine.prefix_cache import common_prefix  # noqa: E402
from tests.engine.stepping import drive  # noqa: E402

GREEDY = dict(temperature=0.0, ignore_eos=True)
SYSTEM = "You are a careful assistant. You answer in one short sentence, politely, and never make things up."


@pytest.fixture(scope="module")
def gguf_path(smollm2_gguf) -> str:
    return str(smollm2_gguf)


@pytest.fixture
def make(gguf_path) -> Iterator:
    """make(**engine kwargs) -> an engine with the prefix cache on (no host tier unless asked), closed after."""
    engines: list[LlamaCppEngine] = []

    def build(**kw) -> LlamaCppEngine:
        kw = {"max_model_len": 512, "flash_attn": False, "prefix_cache_host_bytes": 0, **kw}
        engines.append(LlamaCppEngine(gguf_path, **kw))
        return engines[-1]

    yield build
    for e in engines:
        e.close()


@pytest.fixture(scope="module")
def cold(gguf_path) -> Iterator[LlamaCppEngine]:
    """The same engine without the cache: every prompt computed."""
    engine = LlamaCppEngine(gguf_path, max_model_len=512, flash_attn=False, prefix_cache=False)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tokenizer(cold) -> GGUFTokenizer:
    return GGUFTokenizer(cold.model)


def chat(tokenizer: GGUFTokenizer, *turns: str) -> list[int]:
    """The prompt of a conversation behind SYSTEM: user and assistant turns alternating, a user's last."""
    messages = [{"role": "system", "content": SYSTEM}]
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return tokenizer.render_chat(messages)


def req(rid: str, prompt: list[int], **params) -> EngineRequest:
    return EngineRequest(rid, list(prompt), SamplingParams(**params))


def run(engine: LlamaCppEngine, request: EngineRequest) -> tuple[list[int], EngineOutput, EngineOutput]:
    """A request alone: its tokens, its first output and its final one (with every token's log probabilities)."""
    engine.add_request(request)
    outputs: list[EngineOutput] = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].finished
    merged = EngineOutput(request.request_id, [t for o in outputs for t in o.new_token_ids], outputs[-1].finish_reason)
    if request.params.logprobs is not None:
        merged.logprobs = [lp for o in outputs for lp in o.logprobs or []]
    return merged.new_token_ids, outputs[0], merged


def test_two_conversations_sharing_a_system_prompt_store_it_once(make, tokenizer):
    engine = make()
    a, b = chat(tokenizer, "Name a fruit."), chat(tokenizer, "Name a colour.")
    shared = common_prefix(a, b)
    assert shared > 20  # the chat template and the system prompt
    empty = llama.llama_state_get_size(engine._ctx)
    _, first_a, _ = run(engine, req("a", a, max_new_tokens=3, **GREEDY))
    after_a = llama.llama_state_get_size(engine._ctx)
    _, first_b, _ = run(engine, req("b", b, max_new_tokens=3, **GREEDY))
    after_b = llama.llama_state_get_size(engine._ctx)
    assert first_a.cached_tokens == 0 and first_b.cached_tokens == shared
    # each entry holds its prompt and the generated tokens but the last; the shared leading tokens count once
    held_a, held_b = len(a) + 2, len(b) + 2
    stats = engine.stats()
    assert stats.prefix_cache_kv_bytes == (held_a + held_b - shared) * engine._cell_bytes
    # and llama.cpp agrees: its state grew by b's own cells only (each shared cell names one more sequence id)
    per_cell = (after_a - empty) / held_a
    own = (held_b - shared) * per_cell
    assert own - per_cell < after_b - after_a < own + per_cell + 8 * shared
    assert stats.prefix_cache_queries == len(a) + len(b) and stats.prefix_cache_hits == shared
    assert stats.tokens_in_flight == 0


def test_later_turns_start_from_the_earlier_ones(make, tokenizer, cold):
    engine = make()
    turns = ["Name a fruit."]
    previous = 0
    for i, question in enumerate(["Why that one?", "And a vegetable?"]):
        prompt = chat(tokenizer, *turns)
        tokens, first, _ = run(engine, req(f"t{i}", prompt, max_new_tokens=6, temperature=0.0))
        assert first.cached_tokens is not None and first.cached_tokens >= previous
        assert tokens == run(cold, req(f"c{i}", prompt, max_new_tokens=6, temperature=0.0))[0]
        previous = len(prompt)
        turns += [tokenizer.decode(tokens), question]


def test_an_entry_restored_from_host_memory_gives_the_computed_tokens(make, tokenizer, gguf_path):
    """X's entries leave the pool for host memory and come back for X's repeat with the very cells computed for X:
    the repeat gives the tokens and log probabilities of a repeat that found them in the pool, exactly, because the
    restored cells land where the pool copies sat (an otherwise empty pool starts from its first cell; checked).
    llama.cpp's CPU kernels do not promise more: a reuse computes its last prompt token alone, so it matches a cold
    run that computes the prompt in the same chunks (its first token's log probabilities, exactly), not one that
    computes it in one batch (a near-tie may flip: the pool hit's entry may differ from the first run's)."""
    engine = make(max_model_len=256, max_num_seqs=2, prefix_cache_host_bytes=64 << 20)
    x = chat(tokenizer, "Name a fruit.")
    params = dict(max_new_tokens=6, logprobs=2, **GREEDY)
    # the prompt in a reuse's chunks: all but its last token, then that one
    chunked = LlamaCppEngine(
        gguf_path, max_model_len=512, max_batch_tokens=len(x) - 1, flash_attn=False, prefix_cache=False
    )
    try:
        _, _, computed = run(chunked, req("cold", x, **params))
    finally:
        chunked.close()
    run(engine, req("x0", x, **params))
    again, hit, from_pool = run(engine, req("x1", x, **params))
    assert hit.cached_tokens == len(x) - 1
    while engine._evict():
        pass
    stats = engine.stats()
    assert stats.prefix_cache_kv_bytes == 0 and stats.prefix_cache_host_bytes > 0
    restored, back, from_host = run(engine, req("x2", x, **params))
    assert back.cached_tokens == len(x) - 1
    assert engine.stats().prefix_cache_kv_bytes > 0
    assert restored == again and from_host.logprobs == from_pool.logprobs
    assert from_host.logprobs is not None and computed.logprobs is not None
    assert from_host.logprobs[0] == computed.logprobs[0]


def test_entries_pushed_out_by_other_requests_come_back_from_host_memory(make, tokenizer, cold):
    """Other requests' entries push X's out of the pool into host memory; X's repeat restores it (cached_tokens
    covers its prompt but the last token). The restored cells sit elsewhere in the pool than the cold run's and the
    last prompt token is computed alone, so only the first token is compared (near-ties may flip later)."""
    engine = make(max_model_len=256, max_num_seqs=2, prefix_cache_host_bytes=64 << 20)
    x = chat(tokenizer, "Name a fruit.")
    computed, _, _ = run(cold, req("cold", x, max_new_tokens=4, **GREEDY))
    run(engine, req("x0", x, max_new_tokens=4, **GREEDY))
    others = [tokenizer.render_chat([{"role": "user", "content": f"Count from one to {n}."}]) for n in range(6)]
    for i, prompt in enumerate(others):
        run(engine, req(f"o{i}", prompt, max_new_tokens=40, **GREEDY))
    stats = engine.stats()
    assert stats.prefix_cache_host_bytes > 0 and stats.preemptions == 0
    assert stats.prefix_cache_kv_bytes <= engine.max_model_len * engine._cell_bytes  # the cache lives in the pool
    assert engine._cache is not None and engine._cache.match(x).kv_len < len(x) - 1  # x's entry left the pool
    restored, back, _ = run(engine, req("x1", x, max_new_tokens=4, **GREEDY))
    assert back.cached_tokens == len(x) - 1
    assert restored[:1] == computed[:1]  # the cells sit elsewhere in the pool: near-ties may flip later (docstring)


def test_the_cache_gives_its_room_up_before_a_running_request_is_preempted(make, tokenizer):
    """Entries fill most of a 256-cell pool; two requests that need nearly all of it run without preemption."""
    engine = make(max_model_len=256, max_num_seqs=2)
    fills = [tokenizer.render_chat([{"role": "user", "content": f"Say {i} {'word ' * 10}"}]) for i in range(4)]
    for i, prompt in enumerate(fills):
        run(engine, req(f"fill{i}", prompt, max_new_tokens=30, **GREEDY))
    filled = engine.stats().prefix_cache_kv_bytes // engine._cell_bytes
    assert filled > 128
    big = [req(f"big{i}", [100 + i] + [200 + j for j in range(40)], max_new_tokens=80, **GREEDY) for i in range(2)]
    tokens, final = drive(engine, big)
    stats = engine.stats()
    assert stats.preemptions == 0
    assert all(f.finish_reason == FinishReason.LENGTH and len(tokens[f.request_id]) == 80 for f in final.values())
    # the fill entries gave their cells up: a repeat finds nothing cached
    _, first, _ = run(engine, req("again", fills[0], max_new_tokens=1, **GREEDY))
    assert first.cached_tokens == 0


def test_preemption_resume_logprobs_and_echo_with_the_cache(make, tokenizer, cold):
    engine = make(max_model_len=160, max_num_seqs=4)
    prompts = [chat(tokenizer, f"Tell me about {t}.") for t in ("cats", "dogs", "rain", "tea")]
    # the pool is too small for all four: the newest wait and recompute, starting from the cached system prompt.
    # llama.cpp pads the pool to 256 cells: three 40-token prompts admitted must outgrow that (3 x 100 cells)
    tokens, final = drive(engine, [req(str(i), p, max_new_tokens=60, **GREEDY) for i, p in enumerate(prompts)])
    assert engine.stats().preemptions >= 1
    assert all(f.finish_reason == FinishReason.LENGTH for f in final.values())
    assert all(len(t) == 60 for t in tokens.values())
    # resume: the prompt and the ids generated so far continue the sequence exactly (the cached cells are its own)
    full, _, _ = run(engine, req("full", prompts[0], max_new_tokens=10, **GREEDY))
    rest, first, _ = run(engine, req("rest", prompts[0] + full[:4], max_new_tokens=6, **GREEDY))
    assert first.cached_tokens == len(prompts[0]) + 3 and rest == full[4:]
    # log probabilities on a cache hit: one per token, the sampled token's own, the most likely first
    _, first, out = run(engine, req("lp", prompts[1], max_new_tokens=4, logprobs=3, **GREEDY))
    assert first.cached_tokens and out.logprobs is not None and len(out.logprobs) == 4
    assert all(lp.token_id == t and lp.top[0][0] == t for lp, t in zip(out.logprobs, out.new_token_ids, strict=True))
    # echo computes the whole prompt (nothing cached): one log probability per prompt token, the cold engine's up to
    # rounding. Not exactly: its cells sit among the cache's entries, elsewhere in the pool than the cold engine's,
    # and llama.cpp's attention then sums in another order (seen: 0.3 apart at one position)
    echo = req("echo", prompts[2], max_new_tokens=1, prompt_logprobs=1, **GREEDY)
    _, first, _ = run(engine, echo)
    _, cold_first, _ = run(cold, req("echo-cold", prompts[2], max_new_tokens=1, prompt_logprobs=1, **GREEDY))
    got, want = first.prompt_logprobs, cold_first.prompt_logprobs
    assert first.cached_tokens == 0 and got is not None and want is not None and got[0] is None
    assert [lp.token_id for lp in got[1:]] == [lp.token_id for lp in want[1:]] == prompts[2][1:]
    assert all(abs(a.logprob - b.logprob) < 1.0 for a, b in zip(got[1:], want[1:], strict=True))
    assert cold_first.cached_tokens is None  # an engine without the cache reports none


def test_one_request_at_a_time_without_the_cache_answers_identical_requests_identically(gguf_path, tokenizer):
    """The worker's --deterministic (serving defaults otherwise: flash attention on): the same request gives the same
    tokens and log probabilities whatever ran before it or waits behind it."""
    engine = LlamaCppEngine(gguf_path, max_model_len=512, max_num_seqs=1, prefix_cache=False)
    try:
        x = chat(tokenizer, "Name a fruit.")
        params = dict(max_new_tokens=6, logprobs=1, **GREEDY)
        _, _, first = run(engine, req("x0", x, **params))
        other = chat(tokenizer, "Write a long story about a dragon who loves tea and hates rain.")
        tokens, final = drive(engine, [req("o", other, max_new_tokens=20, **GREEDY), req("x1", x, **params)])
        _, _, again = run(engine, req("x2", x, **params))
        assert tokens["x1"] == first.new_token_ids == again.new_token_ids
        assert again.logprobs == first.logprobs
    finally:
        engine.close()


def test_the_cache_takes_no_more_sequence_ids_than_llama_cpp_can_hold(make, tokenizer):
    """llama.cpp aborts the process on more sequence ids than cells or than one batch's outputs: a small batch or
    context leaves the cache fewer spare ids (it still works), and more running sequences than cells is refused."""
    engine = make(max_batch_tokens=8, max_num_seqs=2)  # 10 outputs a batch
    x = chat(tokenizer, "Name a fruit.")
    run(engine, req("x0", x, max_new_tokens=3, **GREEDY))
    _, first, _ = run(engine, req("x1", x, max_new_tokens=3, **GREEDY))
    assert first.cached_tokens == len(x) - 1
    with pytest.raises(ValueError, match="max_num_seqs"):
        make(max_model_len=48, max_num_seqs=64)
