"""Embeddings, tokenize and model cards through the whole stack in one process: the real API app, the real
controller app, an embedding worker over the real all-MiniLM-L6-v2 (twice: as served, and allowed shorter
vectors) and a chat worker over a scripted engine with the byte tokenizer, all over ASGI, driven by the official
`openai` client and plain HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import httpx2
import openai
import pytest

from lmfleet.api.app import ApiSettings
from lmfleet.api.app import create_app as create_api
from lmfleet.api.routing import Router
from lmfleet.controller.app import ControllerSettings
from lmfleet.controller.app import create_app as create_controller
from lmfleet.engine import embedding, registry
from lmfleet.engine.base import LoadedModel
from lmfleet.engine.embedding.engine import PoolingEngine
from lmfleet.worker.app import WorkerSettings
from lmfleet.worker.app import create_app as create_worker
from tests.api.fakes import StreamingASGITransport, assert_error
from tests.conformance import validate
from tests.fakes import ScriptedEngine, loaded, running
from tests.test_stack import Hosts

pytestmark = pytest.mark.timeout(120)

CONTROLLER, API = "http://controller", "http://api"
MINI, SHORT, CHAT = "minilm", "minilm-short", "chat"


@dataclass
class Stack:
    openai: openai.AsyncOpenAI
    raw: httpx2.AsyncClient
    model: LoadedModel  # the embedding model as loaded once
    hosts: Hosts  # remove a worker's route and it refuses connections, as a killed process would
    router: Router  # the API server's view of the fleet
    http: httpx.AsyncClient  # reaches the workers directly, as the API server does


@pytest.fixture(scope="module")
def minilm_loaded(minilm: Path) -> LoadedModel:
    source = registry.locate(str(minilm))
    return registry.load(source, registry.ENGINES["embedding"], embedding.EmbeddingSettings())


@pytest.fixture
async def stack(minilm_loaded: LoadedModel) -> AsyncIterator[Stack]:
    served = minilm_loaded.engine
    assert isinstance(served, PoolingEngine)
    short = PoolingEngine(  # the same weights, allowed `dimensions` (as --matryoshka would)
        served.model,
        served.pooling,
        max_model_len=served.max_model_len,
        pad_token_id=0,
        matryoshka_dimensions=(),
        max_num_seqs=served.max_num_seqs,
        max_batch_tokens=served.max_batch_tokens,
    )
    loaders = {
        MINI: lambda _s: minilm_loaded,
        f"{MINI}-2": lambda _s: minilm_loaded,  # a second replica of the same model
        SHORT: lambda _s: replace(minilm_loaded, engine=short),
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
                model_names=[name.removesuffix("-2")],
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
        client = openai.AsyncOpenAI(base_url=API + "/v1", api_key="none", max_retries=0, http_client=raw)
        yield Stack(client, raw, minilm_loaded, hosts, state["router"], http)


def norm(v: list[float]) -> float:
    return math.sqrt(math.fsum(x * x for x in v))


async def test_every_input_form_gives_the_models_vectors_and_usage(stack: Stack) -> None:
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The sky is blue today."]
    ids = [stack.model.tokenizer.encode(t) for t in texts]
    expected = stack.model.engine.embed(ids)  # type: ignore[union-attr]
    resp = await stack.raw.post("/v1/embeddings", json={"model": MINI, "input": texts})
    body = resp.json()
    validate("CreateEmbeddingResponse", body)
    assert body["model"] == MINI and [d["index"] for d in body["data"]] == [0, 1, 2]
    assert_vectors([d["embedding"] for d in body["data"]], expected)
    tokens = sum(map(len, ids))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    for given, want in ((texts[0], expected[:1]), (ids[0], expected[:1]), (ids, expected)):
        reply = await stack.openai.embeddings.create(model=MINI, input=given, encoding_format="float")
        assert_vectors([d.embedding for d in reply.data], want)
    default = await stack.openai.embeddings.create(model=MINI, input=texts)  # the client asks for base64
    assert_vectors([list(d.embedding) for d in default.data], expected)


def assert_vectors(got: list[list[float]], want: list[list[float]]) -> None:
    """The model's vectors, to float32 rounding: an input batched with others is padded, and padding changes the
    order of the float sums (the model promises the vector, not its last bits)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-6)


async def test_base64_is_the_little_endian_float32_bytes(stack: Stack) -> None:
    request = {"model": MINI, "input": ["one", "two"]}
    floats = (await stack.raw.post("/v1/embeddings", json=request)).json()
    packed = (await stack.raw.post("/v1/embeddings", json={**request, "encoding_format": "base64"})).json()
    for f, b in zip(floats["data"], packed["data"], strict=True):
        data = base64.b64decode(b["embedding"])
        assert len(data) == 4 * 384
        assert list(struct.unpack("<384f", data)) == f["embedding"]
    assert packed["usage"] == floats["usage"]


async def test_dimensions_only_where_the_model_allows_them(stack: Stack) -> None:
    err = assert_error(
        await stack.raw.post("/v1/embeddings", json={"model": MINI, "input": "x", "dimensions": 64}),
        400,
        param="dimensions",
    )
    assert "Matryoshka" in err["message"]
    full = (await stack.openai.embeddings.create(model=SHORT, input="Shorter vectors", encoding_format="float")).data[0]
    reply = await stack.openai.embeddings.create(
        model=SHORT, input="Shorter vectors", dimensions=64, encoding_format="float"
    )
    short = reply.data[0].embedding
    assert len(short) == 64 and abs(norm(short) - 1) < 1e-6
    head = full.embedding[:64]
    assert short == pytest.approx([x / norm(head) for x in head], abs=1e-6)
    too_many = {"model": SHORT, "input": "x", "dimensions": 385}
    assert_error(await stack.raw.post("/v1/embeddings", json=too_many), 400, param="dimensions")


async def test_inputs_that_do_not_fit_are_refused_never_truncated(stack: Stack) -> None:
    long = " ".join(["word"] * 300)  # > 256 tokens
    err = assert_error(
        await stack.raw.post("/v1/embeddings", json={"model": MINI, "input": ["fine", long]}),
        400,
        param="input",
        code="context_length_exceeded",
    )
    assert "256" in err["message"]
    for bad in ("", [], [[]], [1, -1], ["a", 1], {"text": "a"}, [[1], "a"]):
        assert_error(await stack.raw.post("/v1/embeddings", json={"model": MINI, "input": bad}), 400, param="input")
    assert_error(await stack.raw.post("/v1/embeddings", json={"model": MINI, "input": [[10**6]]}), 400, param="input")
    bad_format = {"model": MINI, "input": "a", "encoding_format": "int8"}
    assert_error(await stack.raw.post("/v1/embeddings", json=bad_format), 400, param="encoding_format")


async def test_each_task_goes_to_its_models_only(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as chat_on_embedder:
        await stack.openai.chat.completions.create(model=MINI, messages=[{"role": "user", "content": "hi"}])
    assert chat_on_embedder.value.body["param"] == "model"  # type: ignore[index]
    assert "does not support chat" in chat_on_embedder.value.message
    with pytest.raises(openai.BadRequestError) as embed_on_chat:
        await stack.openai.embeddings.create(model=CHAT, input="hi")
    assert "does not support embeddings" in embed_on_chat.value.message
    reply = await stack.openai.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hi there."
    assert_error(await stack.raw.post("/v1/embeddings", json={"model": "nope", "input": "a"}), 404, param="model")


async def test_concurrent_requests_each_get_their_own_vectors(stack: Stack) -> None:
    texts = [f"sentence number {i} is {'short' if i % 2 else 'a little bit longer than that'}" for i in range(12)]
    expected = stack.model.engine.embed([stack.model.tokenizer.encode(t) for t in texts])  # type: ignore[union-attr]
    replies = await asyncio.gather(
        *(stack.openai.embeddings.create(model=MINI, input=t, encoding_format="float") for t in texts)
    )
    for reply, want in zip(replies, expected, strict=True):
        assert reply.data[0].embedding == pytest.approx(want, abs=1e-6)


async def test_a_dead_replica_is_left_for_the_live_one(stack: Stack) -> None:
    dead = f"http://worker-{MINI}"
    del stack.hosts.routes[dead]
    for i in range(40):  # until the pick has landed on the dead one at least once
        reply = await stack.openai.embeddings.create(model=MINI, input=f"text {i}", encoding_format="float")
        assert len(reply.data[0].embedding) == 384
        if stack.router.is_ejected(dead):
            break
    assert stack.router.is_ejected(dead), "a request met the dead replica and went on to the live one"
    tokens = (await stack.raw.post("/tokenize", json={"model": MINI, "prompt": "one"})).json()["tokens"]
    assert len(tokens) == 3


async def test_tokenize_and_detokenize_through_each_models_tokenizer(stack: Stack) -> None:
    body = (await stack.raw.post("/tokenize", json={"model": CHAT, "prompt": "héllo"})).json()
    assert body == {"count": 6, "max_model_len": 512, "tokens": list("héllo".encode()), "token_strs": None}
    messages = [{"role": "user", "content": "hi"}]
    chat = (await stack.raw.post("/tokenize", json={"model": CHAT, "messages": messages})).json()
    assert bytes(chat["tokens"]).decode() == "user: hi\nassistant:"
    bare = {"model": CHAT, "messages": messages, "add_generation_prompt": False}
    assert bytes((await stack.raw.post("/tokenize", json=bare)).json()["tokens"]).decode() == "user: hi\n"
    back = (await stack.raw.post("/detokenize", json={"model": CHAT, "tokens": chat["tokens"]})).json()
    assert back == {"prompt": "user: hi\nassistant:"}
    bert = (await stack.raw.post("/tokenize", json={"model": MINI, "prompt": "Hello world"})).json()
    plain = {"model": MINI, "prompt": "Hello world", "add_special_tokens": False}
    assert (await stack.raw.post("/tokenize", json=plain)).json()["tokens"] == bert["tokens"][1:-1]  # no [CLS] [SEP]
    assert bert["max_model_len"] == 256 and bert["count"] == len(bert["tokens"]) == 4
    text = (await stack.raw.post("/detokenize", json={"model": MINI, "tokens": bert["tokens"]})).json()["prompt"]
    assert text == "[CLS] hello world [SEP]"


async def test_tokenize_refuses_what_it_does_not_do(stack: Stack) -> None:
    cases = [
        ({"model": CHAT}, None),
        ({"model": CHAT, "prompt": "a", "messages": [{"role": "user", "content": "a"}]}, None),
        (
            {"model": CHAT, "messages": [{"role": "user", "content": "a"}], "add_special_tokens": True},
            "add_special_tokens",
        ),
        ({"model": CHAT, "prompt": "a", "return_token_strs": True}, "return_token_strs"),
        ({"model": CHAT, "messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}, "tools"),
    ]
    for request, param in cases:
        assert_error(await stack.raw.post("/tokenize", json=request), 400, param=param)
    assert_error(await stack.raw.post("/detokenize", json={"model": CHAT, "tokens": [300]}), 400, param="tokens")
    assert_error(await stack.raw.post("/detokenize", json={"model": CHAT, "tokens": [-1]}), 400, param="tokens")
    assert_error(await stack.raw.post("/tokenize", json={"model": "nope", "prompt": "a"}), 404, param="model")


async def test_model_cards_carry_the_context_length(stack: Stack) -> None:
    listed = (await stack.raw.get("/v1/models")).json()
    validate("ListModelsResponse", listed)
    assert {c["id"]: c["max_model_len"] for c in listed["data"]} == {MINI: 256, SHORT: 256, CHAT: 512}
    card = (await stack.raw.get(f"/v1/models/{CHAT}")).json()
    validate("Model", card)
    assert card["max_model_len"] == 512
    assert (await stack.openai.models.retrieve(MINI)).model_extra == {
        "max_model_len": 256,
        "status": {"value": "loaded"},  # llama-server's router's field (lmfleet.placement)
    }


async def test_workers_report_their_task_and_refuse_the_other(stack: Stack) -> None:
    embedder, chatter = f"http://worker-{MINI}", f"http://worker-{CHAT}"
    assert (await stack.http.get(embedder + "/worker/status")).json()["tasks"] == ["embed", "score"]
    assert (await stack.http.get(chatter + "/worker/status")).json()["tasks"] == ["generate"]
    generate = {"request_id": "g", "prompt": "hi", "max_tokens": 2}
    err = assert_error(await stack.http.post(embedder + "/worker/generate", json=generate), 400, param="model")
    assert "does not generate text" in err["message"]
    embed = {"request_id": "e", "input": ["hi"]}
    assert_error(await stack.http.post(chatter + "/worker/embed", json=embed), 400, param="model")
    ok = (await stack.http.post(embedder + "/worker/embed", json=embed)).json()
    assert len(ok["embeddings"][0]) == 384 and ok["prompt_tokens"] == 3
