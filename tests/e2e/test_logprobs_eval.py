"""Log probabilities on the real model through real processes (controller, one llama.cpp worker with SmolLM2, API
server), and an evaluation harness on top: lm-eval's `local-completions` runs a small multiple-choice task built in
the test's tmp dir (loglikelihoods from `echo` + `logprobs`), fully offline.

lm-eval needs a tokenizer on its side for loglikelihood tasks (to know how many leading tokens are context): the
test saves the GGUF's own tokenizer as a Hugging Face tokenizer folder (transformers reads it from the file, no
download) and passes it; lm-eval then sends token-id prompts with echo, as it does by default.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conformance import validate
from tests.conftest import Fleet

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.timeout(600)

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
QUESTIONS = [
    ("The capital of France is", [" Paris", " Berlin", " Madrid"], 0),
    ("The capital of Germany is", [" Rome", " Berlin", " Lisbon"], 1),
    ("Two plus two equals", [" seven", " nine", " four"], 2),
    ("The sun rises in the", [" east", " west", " cellar"], 0),
]


@pytest.fixture(scope="module")
def fleet(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with Fleet(root=tmp_path_factory.mktemp("logprobs")) as f:
        f.controller()
        f.worker("worker", smollm2_gguf, "--model-names", "smollm2", "--threads", "1", "--max-model-len", "1024")
        f.api()
        f.wait_models(1)
        yield f


def test_chat_logprobs_on_the_real_model(fleet: Fleet) -> None:
    client = openai.OpenAI(base_url=fleet.api_url + "/v1", api_key="none", max_retries=0)
    ask = dict(
        model="smollm2",
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        temperature=0,
        max_tokens=12,
        logprobs=True,
        top_logprobs=3,
    )
    whole = client.chat.completions.create(**ask)
    validate("CreateChatCompletionResponse", whole.model_dump(mode="json", exclude_unset=True))
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens
    assert b"".join(bytes(e.bytes) for e in entries).decode() == whole.choices[0].message.content
    for e in entries:  # greedy: each token is the most likely one, and the top 3 are in order
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.logprob == e.top_logprobs[0].logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    chunks = list(client.chat.completions.create(**ask, stream=True))
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk.model_dump(mode="json", exclude_unset=True))
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-3) for a, b in zip(streamed, entries, strict=True))


def test_echo_gives_the_prompts_loglikelihood(fleet: Fleet) -> None:
    """Completions with echo: the prompt's tokens, the first without a logprob; a likely continuation scores higher
    than an unlikely one (what an evaluation harness relies on)."""
    scores = {}
    for ending in (" Paris.", " a potato."):
        body = httpx.post(
            fleet.api_url + "/v1/completions",
            json={
                "model": "smollm2",
                "prompt": "The capital of France is" + ending,
                "echo": True,
                "logprobs": 1,
                "max_tokens": 1,
                "temperature": 0,
            },
            timeout=60,
        ).json()
        lp = body["choices"][0]["logprobs"]
        assert body["choices"][0]["text"].startswith("The capital of France is" + ending)
        assert lp["token_logprobs"][0] is None and all(v <= 0 for v in lp["token_logprobs"][1:])
        assert "".join(lp["tokens"]).startswith("The capital of France is" + ending)
        prompt_tokens = body["usage"]["prompt_tokens"]
        assert len(lp["tokens"]) == prompt_tokens + 1
        ending_tokens = {" Paris.": 2, " a potato.": 4}[ending]
        scores[ending] = sum(lp["token_logprobs"][prompt_tokens - ending_tokens : prompt_tokens])
    assert scores[" Paris."] > scores[" a potato."]


def test_lm_eval_runs_a_local_task_offline(fleet: Fleet, smollm2_gguf: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    transformers = pytest.importorskip("transformers")
    tokenizer_dir = tmp_path / "tokenizer"
    transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name).save_pretrained(
        tokenizer_dir
    )
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps({"q": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "capitals.yaml").write_text(
        "task: lmfleet_capitals\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    )
    model_args = ",".join(
        [
            "model=smollm2",
            f"base_url={fleet.api_url}/v1/completions",
            "tokenizer_backend=huggingface",
            f"tokenizer={tokenizer_dir}",
            "num_concurrent=1",
            "max_retries=1",
        ]
    )
    out = tmp_path / "results"
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "run",
            "--model",
            "local-completions",
            "--model_args",
            model_args,
            "--tasks",
            "lmfleet_capitals",
            "--include_path",
            str(tasks),
            "--output_path",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]["lmfleet_capitals"]
    assert results["acc,none"] >= 0.75, results  # SmolLM2-135M gets these (measured: all four)
