"""FastChat's worker protocol on an lmfleet worker (lmfleet.worker.fastchat), over a scripted engine and a byte
tokenizer: NUL-separated cumulative objects, stop strings held back, errors in-band with FastChat's codes, the
conversation template (named, mapped from a ChatML chat template token for token, or FastChat's generic one), the
small routes, and the fleet secret."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from lmfleet.engine.base import LoadedModel
from lmfleet.protocol.fastchat import TEMPLATES, Conversation
from lmfleet.worker import textgen
from lmfleet.worker.app import WorkerSettings, create_app
from lmfleet.worker.fastchat import chat_conversation
from tests.api.fakes import StreamingASGITransport
from tests.fakes import ByteTokenizer, ScriptedEngine, loaded, running

SCRIPT = "Hello wörld 🙂 again."
SECRET = "fleet-secret"


class ChatMLTokenizer(ByteTokenizer):
    """The byte tokenizer with a ChatML chat template (no default system prompt) whose control markers are single
    tokens: <|im_start|> is 257, <|im_end|> 258 (and end-of-sequence)."""

    MARKS = {"<|im_start|>": 257, "<|im_end|>": 258}
    eos_token_ids = (258,)
    chat_template = "{{ chatml }}"

    def __len__(self) -> int:
        return 259

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        while text:
            mark = next((m for m in self.MARKS if text.startswith(m)), None)
            if mark is not None:
                ids.append(self.MARKS[mark])
                text = text[len(mark) :]
            else:
                ids.extend(text[0].encode())
                text = text[1:]
        return ids

    def decode(self, ids: Any, *, skip_special_tokens: bool = True) -> str:
        names = {v: k for k, v in self.MARKS.items()}
        out, pending = "", bytearray()
        for i in ids:
            if i in names:
                out += pending.decode(errors="replace") + ("" if skip_special_tokens else names[i])
                pending = bytearray()
            elif i < 256:
                pending.append(i)
        return out + pending.decode(errors="replace")

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Any = None,
        template_kwargs: Any = None,
    ) -> list[int]:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return self.encode(text + ("<|im_start|>assistant\n" if add_generation_prompt else ""))


@pytest.fixture
async def worker(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    options = getattr(request, "param", {})
    engine = ScriptedEngine(SCRIPT, max_model_len=256)
    model = LoadedModel(engine, options["tokenizer"], engine_name="scripted") if "tokenizer" in options else None
    settings = WorkerSettings(
        model_path="fake",
        worker_address="http://worker",
        controller_addresses=[],
        max_queued=4,
        conv_template=options.get("conv_template"),
        registration_secret=options.get("secret"),
    )
    app = create_app(settings, load=lambda _s: model or loaded(engine))
    headers = {"Authorization": f"Bearer {options['secret']}"} if "secret" in options else {}
    async with running(app) as (asgi, _):
        transport = StreamingASGITransport(asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://worker", headers=headers) as client:
            yield client


async def stream(client: httpx.AsyncClient, **params: Any) -> tuple[int, list[dict[str, Any]]]:
    """FastChat's API server's reading of `/worker_generate_stream`: split at NUL bytes, one JSON object each."""
    params.setdefault("model", "fake")
    async with client.stream("POST", "/worker_generate_stream", json=params) as resp:
        raw = b"".join([part async for part in resp.aiter_bytes()])
    assert raw.endswith(b"\0"), raw
    return resp.status_code, [json.loads(part) for part in raw.split(b"\0") if part]


async def test_the_stream_is_cumulative_text_with_usage_and_a_finish_reason(worker) -> None:
    status, objects = await stream(worker, prompt="hi", echo=False, max_new_tokens=100)
    assert status == 200
    texts = [o["text"] for o in objects]
    assert texts[-1] == SCRIPT
    assert all(SCRIPT.startswith(t) for t in texts) and texts == sorted(texts, key=len)  # cumulative, never torn
    assert "\ufffd" not in "".join(texts)  # half a UTF-8 character is held back
    assert [o["finish_reason"] for o in objects] == [None] * (len(objects) - 1) + ["stop"]
    assert all(o["error_code"] == 0 for o in objects)
    n = len(SCRIPT.encode())
    assert objects[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": n, "total_tokens": 2 + n}


async def test_echo_is_fastchats_default_and_puts_the_prompt_in_front(worker) -> None:
    _, objects = await stream(worker, prompt="Say: ", max_new_tokens=5)  # FastChat's worker echoes unless told not
    assert objects[-1]["text"] == "Say: Hello" and objects[-1]["finish_reason"] == "length"
    _, objects = await stream(worker, prompt="Say: ", max_new_tokens=5, echo=None)  # null takes the default too
    assert objects[-1]["text"] == "Say: Hello"


async def test_a_stop_string_is_held_back_and_cut(worker) -> None:
    _, objects = await stream(worker, prompt="x", echo=False, stop="wörld", max_new_tokens=100)
    assert [o["text"] for o in objects][-1] == "Hello "
    assert all(o["text"] in ("", "H", "He", "Hel", "Hell", "Hello", "Hello ") for o in objects)  # never "Hello w"
    assert objects[-1]["finish_reason"] == "stop"


async def test_a_max_new_tokens_past_the_context_stops_at_the_contexts_end(worker) -> None:
    """FastChat's Gradio server asks for 1024 new tokens whatever the model's context; it is not an error."""
    _, objects = await stream(worker, prompt="x" * 250, echo=False, max_new_tokens=1024)
    assert objects[-1]["finish_reason"] == "length" and objects[-1]["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"prompt": "x" * 300}, 40303),  # longer than the context
        ({"prompt": "x", "repetition_penalty": 1.2}, 40302),  # FastChat's worker has it, lmfleet's does not
        ({"prompt": "x", "temperature": 9}, 40302),
        ({"prompt": "x", "images": ["data:image/png;base64,AAAA"]}, 40302),
        ({"temperature": 0.5}, 40001),  # no prompt
        ({"prompt": ["not", "text"]}, 40001),
    ],
)
async def test_errors_travel_in_band_with_fastchats_codes(worker, params: dict, code: int) -> None:
    status, objects = await stream(worker, **params)
    assert status == 200
    assert len(objects) == 1 and objects[0]["error_code"] == code and objects[0]["text"]
    resp = await worker.post("/worker_generate", json=params)
    assert resp.status_code == 200 and resp.json()["error_code"] == code


async def test_worker_generate_answers_the_last_object(worker) -> None:
    resp = await worker.post("/worker_generate", json={"prompt": "x", "echo": False, "max_new_tokens": 5})
    assert resp.json()["text"] == "Hello" and resp.json()["finish_reason"] == "length"


async def test_log_probabilities_in_fastchats_shape(worker) -> None:
    _, objects = await stream(worker, prompt="x", echo=False, max_new_tokens=3, logprobs=2)
    lp = objects[-1]["logprobs"]
    assert lp["tokens"] == ["H", "e", "l"] and len(lp["token_logprobs"]) == 3
    assert lp["text_offset"] == [0, 1, 2] and all(len(top) == 2 for top in lp["top_logprobs"])


async def test_the_small_routes(worker) -> None:
    assert (await worker.post("/count_token", json={"model": "fake", "prompt": "héllo"})).json() == {
        "count": 6,  # bytes: what the worker's tokenizer makes of the prompt
        "error_code": 0,
    }
    assert (await worker.post("/model_details", json={"model": "fake"})).json() == {"context_length": 256}
    status = (await worker.post("/worker_get_status")).json()
    assert {k: status[k] for k in ("model_names", "speed", "queue_length")} == {
        "model_names": ["fake"],
        "speed": 1.0,
        "queue_length": 0,
    }
    assert status["protocol"] == "lmfleet"  # what lmfleet's API server reads to speak lmfleet to it
    refused = (await worker.post("/worker_get_embeddings", json={"model": "fake", "input": ["a"]})).json()
    assert refused["error_code"] == 40302  # a generation model computes no embeddings


async def test_a_chat_template_without_a_fastchat_equivalent_gets_fastchats_generic_one(worker, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="lmfleet.worker"):
        conv = (await worker.post("/worker_get_conv_template", json={"model": "fake"})).json()["conv"]
        await worker.post("/worker_get_conv_template", json={"model": "fake"})
    assert Conversation.model_validate(conv) == TEMPLATES["zero_shot"]
    assert sum("--conv-template" in r.getMessage() for r in caplog.records) == 1  # said once


@pytest.mark.parametrize("worker", [{"conv_template": "qwen-7b-chat"}], indirect=True)
async def test_conv_template_names_fastchats_template(worker) -> None:
    conv = (await worker.post("/worker_get_conv_template", json={"model": "fake"})).json()["conv"]
    assert conv["name"] == "qwen-7b-chat" and conv["sep_style"] == 9  # FastChat's integer SeparatorStyle
    assert conv["roles"] == ["<|im_start|>user", "<|im_start|>assistant"]


@pytest.mark.parametrize("worker", [{"tokenizer": ChatMLTokenizer()}], indirect=True)
async def test_a_chatml_template_maps_to_a_fastchat_one_that_renders_the_same_tokens(worker) -> None:
    conv = Conversation.model_validate((await worker.post("/worker_get_conv_template", json={})).json()["conv"])
    assert conv.sep_style == 9 and conv.roles == ("<|im_start|>user", "<|im_start|>assistant")
    assert conv.system_template == "<|im_start|>system\n{system_message}" and conv.sep == "<|im_end|>"
    assert conv.stop_token_ids == [258]
    tok = ChatMLTokenizer()
    chat = [
        {"role": "system", "content": "Be {terse}."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "A café, 🙂"},
    ]
    assert tok.encode(conv.prompt(chat)) == textgen.render_chat(tok, chat)


def test_a_template_with_a_default_system_prompt_maps_with_it() -> None:
    class Defaulting(ChatMLTokenizer):
        def render_chat(self, messages, *, add_generation_prompt=True, tools=None, template_kwargs=None):
            if messages[0]["role"] != "system":
                messages = [{"role": "system", "content": "You are kind."}, *messages]
            return super().render_chat(messages, add_generation_prompt=add_generation_prompt)

    conv = chat_conversation(Defaulting())
    assert conv is not None and conv.system_message == "You are kind."
    assert Defaulting().encode(conv.prompt([{"role": "user", "content": "Hi"}])) == Defaulting().render_chat(
        [{"role": "user", "content": "Hi"}]
    )
    assert chat_conversation(ByteTokenizer()) is None  # "user: ...\nassistant:" is not ChatML


@pytest.mark.parametrize("worker", [{"secret": SECRET}], indirect=True)
async def test_the_fleet_secret_guards_these_routes_too(worker) -> None:
    async with httpx.AsyncClient(transport=worker._transport, base_url="http://worker") as stranger:
        for path in ("/worker_generate_stream", "/worker_generate", "/count_token", "/worker_get_conv_template"):
            resp = await stranger.post(path, json={"model": "fake", "prompt": "x"})
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key", path
        assert (await stranger.post("/worker_get_status")).status_code == 200  # open, as /worker/status
    _, objects = await stream(worker, prompt="x", echo=False, max_new_tokens=2)  # with the secret
    assert objects[-1]["text"] == "He"
