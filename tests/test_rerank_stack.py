"""Rerank and score through the whole stack in one process: the real API app, the real controller app, a
cross-encoder worker (a tiny random BERT saved as sentence-transformers saves a CrossEncoder: no real one installs
offline), an embedding worker over the real all-MiniLM-L6-v2 (it scores by cosine) and a chat worker over a
scripted engine, all over ASGI. Answers are checked against JSON schemas written from vLLM's protocol and Cohere's
and Jina's docs (none is vendored)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import jsonschema
import pytest

from lmfleet.api.app import ApiSettings
from lmfleet.api.app import create_app as create_api
from lmfleet.controller.app import ControllerSettings
from lmfleet.controller.app import create_app as create_controller
from lmfleet.engine import embedding, registry
from lmfleet.engine.base import LoadedModel, PairTokenizer, ScoringEngine
from lmfleet.worker.app import WorkerSettings
from lmfleet.worker.app import create_app as create_worker
from tests.api.fakes import StreamingASGITransport, assert_error
from tests.crossencoder import make_cross_encoder
from tests.fakes import ScriptedEngine, loaded, running
from tests.test_stack import Hosts

pytestmark = pytest.mark.timeout(120)

CONTROLLER, API = "http://controller", "http://api"
RANKER, MINI, CHAT = "ranker", "minilm", "chat"

# `POST /v1/rerank`'s answer: vLLM's RerankResponse (id, model, usage.total_tokens, results of index, document.text,
# relevance_score), which Jina's and Cohere's v1 results share; `document` is left out with return_documents false.
RERANK_RESPONSE = {
    "type": "object",
    "required": ["id", "model", "results", "usage"],
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "model": {"type": "string"},
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "relevance_score"],
                "additionalProperties": False,
                "properties": {
                    "index": {"type": "integer", "minimum": 0},
                    "relevance_score": {"type": "number"},
                    "document": {
                        "type": "object",
                        "required": ["text"],
                        "properties": {"text": {"type": "string"}},
                    },
                },
            },
        },
        "usage": {
            "type": "object",
            "required": ["total_tokens"],
            "properties": {"total_tokens": {"type": "integer", "minimum": 0}, "prompt_tokens": {"type": "integer"}},
        },
    },
}
# `POST /v1/score`'s answer: vLLM's ScoreResponse.
SCORE_RESPONSE = {
    "type": "object",
    "required": ["id", "object", "created", "model", "data", "usage"],
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "object": {"const": "list"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "object", "score"],
                "properties": {
                    "index": {"type": "integer", "minimum": 0},
                    "object": {"const": "score"},
                    "score": {"type": "number"},
                },
            },
        },
        "usage": {
            "type": "object",
            "required": ["prompt_tokens", "total_tokens"],
            "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}},
        },
    },
}

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Berlin is the capital of Germany.",
    "Paris is the capital of France.",
    "A simple recipe for homemade bread.",
    "The stock market fell sharply on Tuesday.",
]


@dataclass
class Stack:
    raw: httpx2.AsyncClient  # the API server
    ranker: LoadedModel  # the cross-encoder as loaded once
    http: httpx.AsyncClient  # reaches the workers directly, as the API server does

    def expected(self, pairs: list[tuple[str, str]]) -> list[float]:
        """The cross-encoder's own scores for `pairs`, one forward each."""
        engine, tokenizer = self.ranker.engine, self.ranker.tokenizer
        assert isinstance(engine, ScoringEngine) and isinstance(tokenizer, PairTokenizer)
        return [engine.score([tokenizer.encode_pair(a, b)])[0] for a, b in pairs]

    def pair_tokens(self, pairs: list[tuple[str, str]]) -> int:
        tokenizer = self.ranker.tokenizer
        assert isinstance(tokenizer, PairTokenizer)
        return sum(len(tokenizer.encode_pair(a, b).ids) for a, b in pairs)


@pytest.fixture(scope="module")
def ranker_loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = make_cross_encoder(tmp_path_factory.mktemp("ranker") / "tiny-ce")
    source = registry.locate(str(folder))
    return registry.load(source, registry.choose(source), embedding.EmbeddingSettings())


@pytest.fixture(scope="module")
def minilm_loaded(minilm: Path) -> LoadedModel:
    source = registry.locate(str(minilm))
    return registry.load(source, registry.ENGINES["embedding"], embedding.EmbeddingSettings())


@pytest.fixture
async def stack(ranker_loaded: LoadedModel, minilm_loaded: LoadedModel) -> AsyncIterator[Stack]:
    loaders = {
        RANKER: lambda _s: ranker_loaded,
        MINI: lambda _s: minilm_loaded,
        CHAT: lambda _s: loaded(ScriptedEngine("Hi there.", max_model_len=512)),
    }
    hosts = Hosts()
    async with contextlib.AsyncExitStack() as exits:
        http = await exits.enter_async_context(httpx.AsyncClient(transport=hosts))
        controller, _ = await exits.enter_async_context(running(create_controller(ControllerSettings())))
        hosts.routes[CONTROLLER] = StreamingASGITransport(controller)
        for name, load in loaders.items():
            address = f"http://worker-{name}"
            settings = WorkerSettings(
                model_path=f"/models/{name}",
                model_names=[name],
                worker_address=address,
                controller_addresses=[CONTROLLER],
                heartbeat_interval_s=0.05,
            )
            app, _ = await exits.enter_async_context(running(create_worker(settings, load=load, http_client=http)))
            hosts.routes[address] = StreamingASGITransport(app)
        api_settings = ApiSettings(controller_address=CONTROLLER, refresh_interval_s=0.05)
        api, state = await exits.enter_async_context(running(create_api(api_settings, http_client=http)))
        for _ in range(400):
            if len(state["router"].healthy()) == len(loaders):
                break
            await asyncio.sleep(0.02)
        assert len(state["router"].healthy()) == len(loaders), "every worker registered and in the API's view"
        raw = await exits.enter_async_context(httpx2.AsyncClient(transport=httpx2.ASGITransport(app=api), base_url=API))
        yield Stack(raw, ranker_loaded, http)


async def post(stack: Stack, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await stack.raw.post(path, json=body)
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    jsonschema.validate(answer, RERANK_RESPONSE if "rerank" in path else SCORE_RESPONSE)
    return answer


def cosine(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))


async def test_rerank_orders_every_document_by_the_cross_encoders_score(stack: Stack) -> None:
    given = [DOCUMENTS[0], {"text": DOCUMENTS[1], "id": "kept-out"}, *DOCUMENTS[2:]]  # strings and objects
    body = await post(stack, "/v1/rerank", {"model": RANKER, "query": QUERY, "documents": given})
    assert body["model"] == RANKER and body["id"].startswith("rerank-")
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True), "best first"
    expected = stack.expected([(QUERY, d) for d in DOCUMENTS])
    for r in results:
        assert r["relevance_score"] == pytest.approx(expected[r["index"]], abs=1e-5)
        assert r["document"] == {"text": DOCUMENTS[r["index"]]}
    tokens = stack.pair_tokens([(QUERY, d) for d in DOCUMENTS])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


async def test_top_n_and_return_documents(stack: Stack) -> None:
    request = {"model": RANKER, "query": QUERY, "documents": DOCUMENTS}
    full = await post(stack, "/v1/rerank", request)
    top = await post(stack, "/v1/rerank", {**request, "top_n": 2, "return_documents": False})
    assert [r["index"] for r in top["results"]] == [r["index"] for r in full["results"][:2]]
    assert all("document" not in r for r in top["results"])
    for everything in (0, None, 99):  # vLLM's 0, and more than there are: all of them
        assert len((await post(stack, "/v1/rerank", {**request, "top_n": everything}))["results"]) == 4
    alias = await post(stack, "/rerank", request)
    assert alias["results"] == full["results"]
    paths = (await stack.raw.get("/openapi.json")).json()["paths"]
    assert {"/v1/rerank", "/rerank", "/v1/score", "/score"} <= set(paths)


async def test_score_pairs_one_to_one_one_to_many_and_many_to_many(stack: Stack) -> None:
    one = await post(stack, "/v1/score", {"model": RANKER, "text_1": QUERY, "text_2": DOCUMENTS[1]})
    assert one["id"].startswith("score-") and one["object"] == "list" and one["model"] == RANKER
    assert [d["index"] for d in one["data"]] == [0]
    assert one["data"][0]["score"] == pytest.approx(stack.expected([(QUERY, DOCUMENTS[1])])[0], abs=1e-5)
    many = await post(stack, "/score", {"model": RANKER, "text_1": [QUERY], "text_2": DOCUMENTS})
    expected = stack.expected([(QUERY, d) for d in DOCUMENTS])
    assert [d["index"] for d in many["data"]] == [0, 1, 2, 3], "in input order"
    assert [d["score"] for d in many["data"]] == pytest.approx(expected, abs=1e-5)
    queries = ["capital of france", "bread recipe", "stock market", "capital of germany"]
    paired = await post(stack, "/v1/score", {"model": RANKER, "text_1": queries, "text_2": DOCUMENTS})
    pairs = list(zip(queries, DOCUMENTS, strict=True))
    assert [d["score"] for d in paired["data"]] == pytest.approx(stack.expected(pairs), abs=1e-5)
    tokens = stack.pair_tokens(pairs)
    assert paired["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


async def test_an_embedding_model_scores_by_the_cosine_of_its_vectors(stack: Stack) -> None:
    query = "How do I bake bread at home?"
    documents = ["The stock market fell sharply on Tuesday.", "A simple recipe for homemade bread.", "Cats sleep."]
    body = await post(stack, "/v1/rerank", {"model": MINI, "query": query, "documents": documents})
    assert body["results"][0]["index"] == 1, "the relevant document first"
    vectors = [
        d["embedding"]
        for d in (await stack.raw.post("/v1/embeddings", json={"model": MINI, "input": [query, *documents]})).json()[
            "data"
        ]
    ]
    for r in body["results"]:
        assert r["relevance_score"] == pytest.approx(cosine(vectors[0], vectors[1 + r["index"]]), abs=1e-5)
    scored = await post(stack, "/v1/score", {"model": MINI, "text_1": [query] * 3, "text_2": documents})
    assert [d["score"] for d in scored["data"]] == pytest.approx([cosine(vectors[0], v) for v in vectors[1:]], abs=1e-5)
    assert scored["usage"]["prompt_tokens"] == body["usage"]["prompt_tokens"], "each distinct text embedded once"


async def test_each_task_goes_to_its_models_only(stack: Stack) -> None:
    err = assert_error(
        await stack.raw.post("/v1/rerank", json={"model": CHAT, "query": "q", "documents": ["d"]}), 400, param="model"
    )
    assert "does not support rerank and score" in err["message"]
    assert_error(
        await stack.raw.post("/v1/score", json={"model": CHAT, "text_1": "a", "text_2": "b"}), 400, param="model"
    )
    err = assert_error(await stack.raw.post("/v1/embeddings", json={"model": RANKER, "input": "a"}), 400, param="model")
    assert "does not support embeddings; it serves rerank and score" in err["message"]
    chat = {"model": RANKER, "messages": [{"role": "user", "content": "hi"}]}
    assert_error(await stack.raw.post("/v1/chat/completions", json=chat), 400, param="model")
    statuses = {n: (await stack.http.get(f"http://worker-{n}/worker/status")).json() for n in (RANKER, MINI, CHAT)}
    assert {n: s["tasks"] for n, s in statuses.items()} == {
        RANKER: ["score"],
        MINI: ["embed", "score"],
        CHAT: ["generate"],
    }
    assert statuses[RANKER]["context_length"] == 128
    pairs = {"request_id": "s", "text_1": ["a"], "text_2": ["b"]}
    assert_error(await stack.http.post(f"http://worker-{CHAT}/worker/score", json=pairs), 400, param="model")
    assert_error(
        await stack.http.post(f"http://worker-{RANKER}/worker/embed", json={"request_id": "e", "input": ["a"]}),
        400,
        param="model",
    )
    assert_error(
        await stack.raw.post("/v1/rerank", json={"model": "nope", "query": "q", "documents": ["d"]}), 404, param="model"
    )


async def test_what_does_not_fit_or_is_not_implemented_is_refused_by_name(stack: Stack) -> None:
    long = " ".join(["bread"] * 150)  # > 128 tokens with the query
    err = assert_error(
        await stack.raw.post("/v1/rerank", json={"model": RANKER, "query": QUERY, "documents": ["ok", long]}),
        400,
        param="documents",
        code="context_length_exceeded",
    )
    assert "128" in err["message"] and "index 1" in err["message"]
    score_long = {"model": RANKER, "text_1": QUERY, "text_2": long}
    assert_error(
        await stack.raw.post("/v1/score", json=score_long), 400, param="text_2", code="context_length_exceeded"
    )
    minilm_long = {"model": MINI, "query": " ".join(["word"] * 300), "documents": ["a"]}
    assert_error(
        await stack.raw.post("/v1/rerank", json=minilm_long), 400, param="query", code="context_length_exceeded"
    )
    cases = [
        ("/v1/rerank", {"query": QUERY, "documents": []}, "documents"),
        ("/v1/rerank", {"query": QUERY, "documents": ["a", ""]}, "documents.1"),
        ("/v1/rerank", {"query": QUERY, "documents": [{"title": "no text"}]}, "documents"),
        ("/v1/rerank", {"query": "", "documents": ["a"]}, "query"),
        ("/v1/rerank", {"query": QUERY, "documents": ["a"], "top_n": -1}, "top_n"),
        ("/v1/rerank", {"query": QUERY, "documents": ["a"], "max_tokens_per_doc": 64}, "max_tokens_per_doc"),
        ("/v1/rerank", {"query": QUERY, "documents": ["a"], "truncate_prompt_tokens": 64}, "truncate_prompt_tokens"),
        ("/v1/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_2"),
        ("/v1/score", {"text_1": "a", "text_2": []}, "text_2"),
        ("/v1/score", {"text_1": "a", "text_2": "b", "use_activation": False}, "use_activation"),
    ]
    for path, request, param in cases:
        assert_error(await stack.raw.post(path, json={"model": RANKER, **request}), 400, param=param)


async def test_concurrent_requests_each_get_their_own_scores(stack: Stack) -> None:
    queries = [f"question number {i} about {'bread' if i % 2 else 'the capital of france'}" for i in range(8)]
    replies = await asyncio.gather(
        *(post(stack, "/v1/score", {"model": RANKER, "text_1": q, "text_2": DOCUMENTS}) for q in queries)
    )
    for query, reply in zip(queries, replies, strict=True):
        want = stack.expected([(query, d) for d in DOCUMENTS])
        assert [d["score"] for d in reply["data"]] == pytest.approx(want, abs=1e-5)
