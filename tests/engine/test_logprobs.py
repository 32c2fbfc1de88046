"""Log probabilities from both engines equal a direct forward pass of the same model over the same tokens: the
log-softmax of the raw next-token logits (before temperature, penalties, logit_bias), for generated tokens and, with
`prompt_logprobs` (echo), for every prompt token after the first.

transformers: the tiny random LLaMA in float32, batched with companions of other lengths, against one forward of
prompt + generated ids: equal within 1e-4. llama.cpp: the real SmolLM2 GGUF, one request alone (flash attention and
the prefix cache off), against llama-cpp-python's own `Llama(..., logits_all=True)` evaluating the same ids the same
way (the prompt in one batch, then one token at a time): within 1e-5 (measured: equal). llama.cpp's prefill and
one-token decode kernels are not bit-equal, so a reference that evaluates prompt and output in one batch differs
by up to 0.1-0.3 on the generated tokens.
"""

from __future__ import annotations

import math

import pytest

from lmfleet.engine.base import EngineOutput, EngineRequest, SamplingParams, TokenLogprob

SAMPLED = dict(temperature=1.3, top_k=8, presence_penalty=1.0, frequency_penalty=0.5, logit_bias=((5, 30.0),), seed=3)


def collect(engine, requests: list[EngineRequest]) -> dict[str, list[EngineOutput]]:
    for r in requests:
        engine.add_request(r)
    outs: dict[str, list[EngineOutput]] = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def check_entry(entry: TokenLogprob | None, token: int, row: list[float], k: int, tol: float) -> None:
    """`entry` is `token`'s log probability under `row` (a reference log-softmax), with the k most likely."""
    assert entry is not None and entry.token_id == token
    assert abs(entry.logprob - row[token]) <= tol
    assert len(entry.top) == k
    values = [v for _, v in entry.top]
    assert values == sorted(values, reverse=True)
    best = sorted(row, reverse=True)[:k]
    for (tid, value), expected in zip(entry.top, best, strict=True):
        assert abs(value - row[tid]) <= tol and abs(value - expected) <= tol
    assert math.isclose(sum(math.exp(v) for v in row), 1.0, rel_tol=1e-3)


def check_request(outs: list[EngineOutput], prompt: list[int], reference, k: int, k_prompt: int | None, tol: float):
    """reference(ids) -> a log-softmax row per position of ids (row p predicts token p + 1)."""
    generated = [t for o in outs for t in o.new_token_ids]
    entries = [e for o in outs for e in (o.logprobs or [])]
    assert generated and len(entries) == len(generated)
    rows = reference(prompt + generated)
    for j, (token, entry) in enumerate(zip(generated, entries, strict=True)):
        check_entry(entry, token, rows[len(prompt) - 1 + j], k, tol)
    echoed = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    if k_prompt is None:
        assert not echoed
        return
    assert len(echoed) == 1 and outs[0].prompt_logprobs is echoed[0]  # once, on the first output
    assert echoed[0][0] is None and len(echoed[0]) == len(prompt)
    for p in range(1, len(prompt)):
        check_entry(echoed[0][p], prompt[p], rows[p - 1], k_prompt, tol)


def test_transformers_logprobs_equal_a_forward_pass(tiny_models):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lmfleet.engine.transformers.engine import TransformersEngine

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["alpha"], dtype=torch.float32)

    def reference(ids: list[int]) -> list[list[float]]:
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1).tolist()

    prompts = {"a": [3, 17, 99, 4, 250, 31, 8], "b": [7, 1000, 12], "c": [44, 45, 46, 47, 48, 49, 50, 51, 52, 53]}
    asks = {  # request -> (params, logprobs, prompt_logprobs)
        "a": (dict(temperature=0.0), 5, 3),
        "b": (SAMPLED, 0, None),
        "c": (dict(temperature=0.0), 20, 0),
        "plain": (dict(temperature=0.0), None, None),
    }
    requests = [
        EngineRequest(
            rid,
            prompts.get(rid, prompts["a"]),
            SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=k, prompt_logprobs=kp, **params),
        )
        for rid, (params, k, kp) in asks.items()
    ]
    outs = collect(TransformersEngine(model, max_num_seqs=4, max_batch_tokens=64), requests)
    for rid, (_, k, kp) in asks.items():
        if k is None:
            assert all(o.logprobs is None and o.prompt_logprobs is None for o in outs[rid])
            continue
        check_request(outs[rid], prompts[rid], reference, k, kp, tol=1e-4)
    # the biased request's tokens came out of the biased distribution, its logprobs out of the raw one
    assert [t for o in outs["b"] for t in o.new_token_ids].count(5) >= 10


def test_llamacpp_logprobs_equal_llama_cpp_pythons_logits(smollm2_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from lmfleet.engine.llamacpp.engine import LlamaCppEngine
    from lmfleet.engine.llamacpp.tokenizer import GGUFTokenizer

    engine = LlamaCppEngine(  # prompts prefilled in chunks of 8
        str(smollm2_gguf), max_model_len=512, max_batch_tokens=8, flash_attn=False, prefix_cache=False
    )
    try:
        tok = GGUFTokenizer(engine.model)
        reference = llama_cpp.Llama(
            str(smollm2_gguf), n_ctx=512, logits_all=True, flash_attn=False, verbose=False, n_threads=2
        )
        prompt = tok.encode("The capital of France is Paris. The capital of Italy is")
        for rid, params, k, kp in [("greedy", dict(temperature=0.0), 5, 4), ("sampled", SAMPLED, 2, None)]:
            outs = collect(
                engine,
                [
                    EngineRequest(
                        rid,
                        prompt,
                        SamplingParams(max_new_tokens=10, ignore_eos=True, logprobs=k, prompt_logprobs=kp, **params),
                    )
                ],
            )
            generated = [t for o in outs[rid] for t in o.new_token_ids]
            reference.reset()
            reference.eval(prompt)
            for token in generated:
                reference.eval([token])
            scores = np.asarray(reference.scores[: len(prompt) + len(generated)], dtype=np.float64)
            rows = scores - scores.max(-1, keepdims=True)
            rows = (rows - np.log(np.exp(rows).sum(-1, keepdims=True))).tolist()
            check_request(outs[rid], prompt, lambda ids, rows=rows: rows, k, kp, tol=1e-5)
        reference.close()
    finally:
        engine.close()
