"""Rerank and score end to end: `lmfleet serve` runs a cross-encoder (a tiny random BERT saved by
sentence-transformers as a CrossEncoder: no real one installs offline) and an embedding model (the real
all-MiniLM-L6-v2) side by side as real processes, asked over plain HTTP as a retrieval pipeline asks; the
cross-encoder's scores are checked against sentence-transformers' own `CrossEncoder` on the same folder, the
embedding model's against the cosine of its /v1/embeddings vectors."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import Proc, free_port, module_cmd, wait_until
from tests.crossencoder import make_cross_encoder

pytest.importorskip("torch")
pytestmark = pytest.mark.timeout(300)

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Berlin is the capital of Germany.",
    "Paris is the capital of France.",
    "A simple recipe for homemade bread.",
    "The stock market fell sharply on Tuesday.",
    "Ünïcödé and emoji 🙂 are tokenized too.",
]


@pytest.fixture(scope="module")
def ranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cross_encoder(tmp_path_factory.mktemp("ranker") / "tiny-ce")


@pytest.fixture(scope="module")
def api(ranker: Path, minilm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("rerank")
    port = free_port()
    cmd = module_cmd(
        "cli",
        "serve",
        "--model-path",
        str(ranker),
        "--model-names",
        "ranker",
        "--model-path",
        str(minilm),
        "--model-names",
        "minilm",
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
def reference(ranker: Path) -> Iterator[object]:
    """sentence-transformers itself, reading the same folder, offline."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        from sentence_transformers import CrossEncoder

        yield CrossEncoder(str(ranker), device="cpu")


def post(api: str, path: str, body: dict) -> dict:
    resp = httpx.post(api + path, json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def cosine(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))


def test_the_cross_encoder_ranks_as_sentence_transformers_does(api: str, reference) -> None:
    expected = reference.rank(QUERY, DOCUMENTS)  # [{"corpus_id", "score"}], best first
    body = post(api, "/v1/rerank", {"model": "ranker", "query": QUERY, "documents": DOCUMENTS, "top_n": 3})
    assert body["model"] == "ranker" and len(body["results"]) == 3
    assert [r["index"] for r in body["results"]] == [e["corpus_id"] for e in expected[:3]]
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx(
        [e["score"] for e in expected[:3]], abs=1e-5
    )
    assert body["results"][0]["document"] == {"text": DOCUMENTS[expected[0]["corpus_id"]]}
    queries = [QUERY, "bread", "money", "berlin", "emoji"]
    scored = post(api, "/score", {"model": "ranker", "text_1": queries, "text_2": DOCUMENTS})
    want = reference.predict(list(zip(queries, DOCUMENTS, strict=True))).tolist()
    assert [d["score"] for d in scored["data"]] == pytest.approx(want, abs=1e-5)


def test_concurrent_reranks_each_get_their_own_scores(api: str, reference) -> None:
    queries = [f"question {i} about {'bread' if i % 2 else 'paris'}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(
                lambda q: post(api, "/v1/rerank", {"model": "ranker", "query": q, "documents": DOCUMENTS}), queries
            )
        )
    for query, reply in zip(queries, replies, strict=True):
        want = reference.predict([(query, d) for d in DOCUMENTS]).tolist()
        for r in reply["results"]:
            assert r["relevance_score"] == pytest.approx(want[r["index"]], abs=1e-5)


def test_an_embedding_model_ranks_the_relevant_document_first_by_cosine(api: str) -> None:
    query = "How do I bake bread at home?"
    documents = ["The stock market fell sharply on Tuesday.", "A simple recipe for homemade bread.", "Cats sleep."]
    body = post(api, "/v1/rerank", {"model": "minilm", "query": query, "documents": documents})
    assert body["results"][0]["index"] == 1
    assert body["results"][0]["relevance_score"] > body["results"][1]["relevance_score"] + 0.2
    vectors = [
        d["embedding"] for d in post(api, "/v1/embeddings", {"model": "minilm", "input": [query, *documents]})["data"]
    ]
    for r in body["results"]:
        assert r["relevance_score"] == pytest.approx(cosine(vectors[0], vectors[1 + r["index"]]), abs=1e-5)


def test_each_model_answers_its_own_tasks_only(api: str) -> None:
    chat = httpx.post(
        api + "/v1/chat/completions", json={"model": "ranker", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "model"
    vectors = httpx.post(api + "/v1/embeddings", json={"model": "ranker", "input": "hi"})
    assert vectors.status_code == 400 and "does not support embeddings" in vectors.json()["error"]["message"]
    cards = {m["id"]: m["max_model_len"] for m in httpx.get(api + "/v1/models").json()["data"]}
    assert cards == {"ranker": 128, "minilm": 256}
