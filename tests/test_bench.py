"""`lmfleet bench` against a fake OpenAI-compatible server on a loopback port: what it sends, what it counts.

The fake streams a known number of content chunks (plus a usage chunk when asked for it), and can fail chosen
requests before or during the stream, hold requests until several are in flight together, hang, or ignore
`stream`. Assertions are on the JSON report: counts, tokens, errors and the shape of the latency summaries,
never on timings.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmfleet import errors
from lmfleet.bench import stats
from lmfleet.bench.main import main as bench_main
from lmfleet.bench.settings import BenchSettings
from tests.conftest import Fleet

MODEL = "fake-model"
SECRET = "s3cret-key-for-tests"


@dataclass
class FakeConfig:
    chunks: int = 5  # content chunks per answer (fewer when max_tokens is smaller; max_tokens with ignore_eos)
    usage: bool = True  # send the usage chunk when the client asks for it
    fail_http: set[int] = field(default_factory=set)  # request numbers (1-based) answered with HTTP 500
    fail_stream: set[int] = field(default_factory=set)  # request numbers that send an error event mid-stream
    api_key: str | None = None
    barrier: int = 0  # hold each request until this many are in flight together
    hang: bool = False  # send one chunk, then nothing
    ignore_stream: bool = False  # answer stream=true with a plain JSON body
    cached: str | None = None  # say how many prompt tokens were cached (one per message): "usage" or "timings"
    received: list[dict] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    arrived: int = 0
    groups: dict[int, asyncio.Event] = field(default_factory=dict)


class FakeServer:
    def __init__(self) -> None:
        self.config = FakeConfig()
        self.base_url = ""

    def reset(self, **kw) -> FakeConfig:
        self.config = FakeConfig(**kw)
        return self.config


def _sse(obj: dict | str, *, compact: bool = False) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj)
    return (f"data:{data}\n\n" if compact else f"data: {data}\n\n").encode()


def create_fake_app(server: FakeServer) -> FastAPI:
    app = FastAPI()
    errors.install_handlers(app)

    def check_auth(request: Request) -> None:
        cfg = server.config
        cfg.auth_headers.append(request.headers.get("authorization", ""))
        if cfg.api_key is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
                raise errors.AuthenticationFailed("Incorrect API key provided")

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}, {"id": "other", "object": "model"}]}

    async def generate(request: Request, kind: str):
        check_auth(request)
        cfg = server.config
        body = await request.json()
        cfg.received.append(body)
        number = len(cfg.received)
        if number in cfg.fail_http:
            raise errors.LmfleetError(f"boom on request {number}")
        n = body["max_tokens"] if body.get("ignore_eos") else min(cfg.chunks, body["max_tokens"])
        texts = [f"tok{i} " for i in range(n)]
        usage = {"prompt_tokens": 11, "completion_tokens": n, "total_tokens": 11 + n}
        timings = {}  # llama-server's: on the last chunk (or the body), `cache_n` the prompt tokens it had cached
        if cfg.cached == "usage":
            usage["prompt_tokens_details"] = {"cached_tokens": len(body.get("messages", []))}
        elif cfg.cached == "timings":
            timings = {"timings": {"cache_n": len(body.get("messages", [])), "prompt_n": 3}}

        def choice(text: str | None, finish: str | None = None) -> dict:
            if kind == "chat":
                return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
            return {"index": 0, "text": text or "", "finish_reason": finish}

        async def held():
            cfg.in_flight += 1
            cfg.max_in_flight = max(cfg.max_in_flight, cfg.in_flight)
            try:
                if cfg.barrier:  # requests pass in groups of `barrier`, each group once all of it has arrived
                    group = cfg.arrived // cfg.barrier
                    cfg.arrived += 1
                    released = cfg.groups.setdefault(group, asyncio.Event())
                    if cfg.arrived % cfg.barrier == 0:
                        released.set()
                    await asyncio.wait_for(released.wait(), 10)
            finally:
                cfg.in_flight -= 1

        if not body.get("stream") or cfg.ignore_stream:
            await held()
            if kind == "chat":
                choices = [{"index": 0, "message": {"role": "assistant", "content": "".join(texts)}}]
            else:
                choices = [{"index": 0, "text": "".join(texts)}]
            out = {"id": "x", "object": "completion", "model": MODEL, "choices": choices, **timings}
            if cfg.usage:
                out["usage"] = usage
            return JSONResponse(out)

        async def stream():
            await held()
            if kind == "chat":  # the role chunk carries no content and must not count as the first token
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            yield b": keep-alive comment\n\n"
            for i, text in enumerate(texts):
                if cfg.hang and i == 1:
                    await asyncio.sleep(60)
                if number in cfg.fail_stream and i == 2:
                    yield _sse({"error": {"message": f"engine died on request {number}", "type": "upstream_error"}})
                    return
                yield _sse({"id": "x", "model": MODEL, "choices": [choice(text)]}, compact=i == 0)
                await asyncio.sleep(0.001)
            yield _sse({"id": "x", "model": MODEL, "choices": [choice(None, "length")], **timings})
            if cfg.usage and (body.get("stream_options") or {}).get("include_usage"):
                yield _sse({"id": "x", "model": MODEL, "choices": [], "usage": usage})
            yield _sse("[DONE]")

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completions")

    return app


@pytest.fixture(scope="module")
def fake():
    server = FakeServer()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_fake_app(server), log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    server.base_url = f"http://127.0.0.1:{port}/v1"
    yield server
    uv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def run(fake, tmp_path):
    """Run `lmfleet bench` against the fake; returns (exit code, JSON report or None)."""

    def _run(*args: str) -> tuple[int, dict | None]:
        path = tmp_path / "report.json"
        path.unlink(missing_ok=True)
        code = bench_main(["--base-url", fake.base_url, "--quiet", "--json", str(path), *args])
        return code, (json.loads(path.read_text()) if path.exists() else None)

    return _run


def _assert_summary(summary: dict) -> None:
    assert set(summary) == {"n", "mean", "p50", "p95", "p99"}
    assert 0 <= summary["p50"] <= summary["p95"] <= summary["p99"]


# ---------------------------------------------------------------------------------------------- statistics


def test_percentile_interpolates_between_ranks():
    assert stats.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert stats.percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert stats.percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert stats.percentile([7.0], 99) == 7.0
    values = [float(v) for v in range(1, 101)]
    assert stats.percentile(values, 95) == pytest.approx(95.05)
    assert stats.percentile(values, 99) == pytest.approx(99.01)
    with pytest.raises(ValueError):
        stats.percentile([], 50)
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_summarize_reports_milliseconds_in_order():
    assert stats.summarize([]) is None
    s = stats.summarize([0.3, 0.1, 0.2, 0.4])  # seconds in, unsorted
    assert s is not None
    assert s.n == 4
    assert s.mean == pytest.approx(250.0)
    assert s.p50 == pytest.approx(250.0)
    assert 100.0 <= s.p50 <= s.p95 <= s.p99 <= 400.0
    one = stats.summarize([0.05])
    assert one is not None and one.p50 == one.p95 == one.p99 == pytest.approx(50.0)


def test_level_result_counts_only_successful_requests():
    results = [
        stats.RequestResult(ok=True, latency=1.0, output_tokens=10, ttft=0.1, itl=[0.05, 0.07]),
        stats.RequestResult(ok=True, latency=2.0, output_tokens=6, token_source="chunks", ttft=0.2, itl=[0.09]),
        stats.RequestResult(ok=False, latency=0.5, error="HTTP 500: a"),
        stats.RequestResult(ok=False, latency=0.5, error="HTTP 500: a"),
        stats.RequestResult(ok=False, latency=0.5, error="timed out after 1 s"),
    ]
    level = stats.LevelResult.from_results(4, results, duration_s=4.0)
    assert (level.requests, level.ok, level.errors) == (5, 2, 3)
    assert level.error_messages == ["HTTP 500: a", "timed out after 1 s"]  # distinct, in order seen
    assert level.output_tokens == 16
    assert level.output_tok_s == pytest.approx(4.0)
    assert level.requests_per_s == pytest.approx(0.5)
    assert level.itl_ms is not None and level.itl_ms.n == 3
    assert level.token_source == {"usage": 1, "chunks": 1}


def test_requests_per_level_default_and_floor():
    assert BenchSettings().requests_for(4) == 8
    assert BenchSettings(requests=3).requests_for(1) == 3
    assert BenchSettings(requests=3).requests_for(16) == 16


# ---------------------------------------------------------------------------------------------- against the fake


def test_streaming_chat_sweep(fake, run, capsys):
    cfg = fake.reset(chunks=5)
    code, report = run("--concurrency", "1,3", "--warmup", "1", "--max-tokens", "16")
    assert code == 0
    assert report["mode"] == "http"
    assert report["config"]["model"] == MODEL  # the first of GET /models
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 3]
    assert [lv["requests"] for lv in report["levels"]] == [2, 6]  # 2x the level by default
    assert len(cfg.received) == 1 + 2 + 6  # warmup is sent, not reported
    for lv in report["levels"]:
        assert lv["ok"] == lv["requests"] and lv["errors"] == 0 and lv["error_messages"] == []
        assert lv["output_tokens"] == 5 * lv["requests"]
        assert lv["prompt_tokens"] == 11 * lv["requests"]
        assert lv["token_source"] == {"usage": lv["requests"]}
        assert lv["output_tok_s"] > 0 and lv["requests_per_s"] > 0 and lv["duration_s"] > 0
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            _assert_summary(lv[key])
        assert lv["ttft_ms"]["n"] == lv["requests"]
        assert lv["itl_ms"]["n"] == 4 * lv["requests"]  # gaps between 5 content chunks
        assert lv["ttft_ms"]["p99"] <= lv["e2e_ms"]["p99"]
    sent = cfg.received[-1]
    assert sent["model"] == MODEL and sent["stream"] is True and sent["max_tokens"] == 16
    assert sent["temperature"] == 0
    assert sent["stream_options"] == {"include_usage": True}
    assert "ignore_eos" not in sent  # real OpenAI rejects unknown fields
    assert sent["messages"][0]["role"] == "user" and len(sent["messages"][0]["content"].split()) == 20
    prompts = {r["messages"][0]["content"] for r in cfg.received}
    assert len(prompts) == len(cfg.received)  # no two requests share a prompt (no prefix-cache shortcut)
    assert cfg.auth_headers[-1] == ""  # no key configured, none sent

    table = capsys.readouterr().out.splitlines()
    assert "TTFT ms" in table[0] and "E2E s" in table[0]
    assert table[1].split()[:6] == ["conc", "ok", "err", "out", "tok", "out"]
    assert table[2].split()[:4] == ["1", "2", "0", "10"]
    assert table[3].split()[:4] == ["3", "6", "0", "30"]
    assert len({len(line) for line in table[1:4]}) == 1  # aligned columns


def test_each_level_keeps_its_concurrency_in_flight(fake, run):
    # The fake holds every request until 3 are in flight at once; a bench that sent fewer would time out.
    cfg = fake.reset(barrier=3)
    code, report = run("--concurrency", "3", "--requests", "6", "--warmup", "0", "--timeout", "30")
    assert code == 0
    assert report["levels"][0]["ok"] == 6
    assert cfg.max_in_flight == 3


def test_failed_requests_are_counted_with_their_messages(fake, run, capsys):
    cfg = fake.reset(chunks=5, fail_http={2}, fail_stream={4, 5})
    code, report = run("--concurrency", "1", "--requests", "6", "--warmup", "0")
    assert code == 0  # some requests succeeded
    (lv,) = report["levels"]
    assert (lv["requests"], lv["ok"], lv["errors"]) == (6, 3, 3)
    assert lv["output_tokens"] == 3 * 5  # failed streams' partial output is not counted
    assert lv["error_messages"] == [
        "HTTP 500: boom on request 2",
        "stream error: engine died on request 4",
        "stream error: engine died on request 5",
    ]
    assert len(cfg.received) == 6
    out = capsys.readouterr().out
    assert "3 of 6 requests failed" in out and "boom on request 2" in out


def test_api_key_from_flag_or_env_and_never_printed(fake, run, capsys, monkeypatch):
    cfg = fake.reset(api_key=SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    code, report = run("--concurrency", "2", "--warmup", "0")
    assert code == 0 and report["levels"][0]["ok"] == 4
    assert cfg.auth_headers and set(cfg.auth_headers) == {f"Bearer {SECRET}"}

    fake.reset(api_key=SECRET)
    code, report = run("--concurrency", "2", "--warmup", "0", "--api-key", "wrong", "--model", MODEL)
    assert code == 1  # a level with no successful request
    (lv,) = report["levels"]
    assert lv["ok"] == 0 and lv["errors"] == 4
    assert lv["error_messages"] == ["HTTP 401: Incorrect API key provided"]

    fake.reset(api_key=SECRET)
    code, report = run("--api-key", "wrong")  # the model lookup itself is refused
    assert code == 2 and report is None
    captured = capsys.readouterr()
    assert "could not get a model" in captured.err and "HTTP 401" in captured.err
    assert SECRET not in captured.out + captured.err and "wrong" not in captured.out + captured.err


def test_key_is_not_in_the_json_report(fake, run):
    fake.reset(api_key=SECRET)
    code, report = run("--concurrency", "1", "--requests", "1", "--warmup", "0", "--api-key", SECRET)
    assert code == 0
    assert SECRET not in json.dumps(report)


def test_stream_without_usage_counts_content_chunks(fake, run, capsys):
    fake.reset(chunks=7, usage=False)
    code, report = run("--concurrency", "2", "--requests", "3", "--warmup", "0")
    assert code == 0
    (lv,) = report["levels"]
    assert lv["requests"] == 3 and lv["output_tokens"] == 3 * 7
    assert lv["token_source"] == {"chunks": 3}
    assert lv["prompt_tokens"] is None
    assert "counted as chunks" in capsys.readouterr().out


def test_completions_without_stream_with_ignore_eos(fake, run):
    cfg = fake.reset(chunks=3)
    code, report = run(
        "--endpoint", "completions", "--no-stream", "--ignore-eos", "--max-tokens", "9",
        "--concurrency", "2", "--warmup", "0", "--prompt", "Once upon a time",
    )  # fmt: skip
    assert code == 0
    (lv,) = report["levels"]
    assert lv["ok"] == 4 and lv["output_tokens"] == 4 * 9  # ignore_eos: exactly max_tokens
    assert lv["ttft_ms"] is None and lv["itl_ms"] is None  # not measurable without a stream
    _assert_summary(lv["e2e_ms"])
    for sent in cfg.received:
        assert sent["prompt"] == "Once upon a time"
        assert sent["ignore_eos"] is True and sent["stream"] is False
        assert "stream_options" not in sent and "logprobs" not in sent


def test_logprobs_are_asked_for_in_each_endpoints_spelling(fake, run):
    for endpoint, expected in [("chat", {"logprobs": True, "top_logprobs": 2}), ("completions", {"logprobs": 2})]:
        cfg = fake.reset(chunks=3)
        code, _ = run("--endpoint", endpoint, "--logprobs", "2", "--concurrency", "1", "--warmup", "0")
        assert code == 0
        assert cfg.received and all({k: sent.get(k) for k in expected} == expected for sent in cfg.received)


def test_response_format_is_sent_with_every_chat_request(fake, run, tmp_path):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    for value, expected in (
        ("json_object", {"type": "json_object"}),
        (
            str(tmp_path / "schema.json"),
            {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema, "strict": True}},
        ),
        (
            json.dumps(schema),
            {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema, "strict": True}},
        ),
    ):
        cfg = fake.reset(chunks=2)
        code, _ = run("--concurrency", "1", "--warmup", "0", "--response-format", value)
        assert code == 0 and [sent["response_format"] for sent in cfg.received] == [expected] * 2


def test_chat_without_stream_and_without_usage_counts_words(fake, run):
    fake.reset(chunks=4, usage=False)
    code, report = run("--no-stream", "--concurrency", "1", "--requests", "2", "--warmup", "0")
    assert code == 0
    (lv,) = report["levels"]
    assert lv["output_tokens"] == 2 * 4 and lv["token_source"] == {"words": 2}


def test_slow_requests_time_out_and_the_run_ends(fake, run):
    fake.reset(hang=True)
    code, report = run("--concurrency", "2", "--warmup", "0", "--timeout", "0.5")
    assert code == 1
    (lv,) = report["levels"]
    assert lv["errors"] == 4 and lv["error_messages"] == ["timed out after 0.5 s"]


def test_a_json_answer_to_a_stream_request_is_an_error(fake, run):
    fake.reset(ignore_stream=True)
    code, report = run("--concurrency", "1", "--requests", "1", "--warmup", "0")
    assert code == 1
    assert report["levels"][0]["error_messages"] == ["stream ended without any data event"]


def test_json_to_stdout_moves_the_table_to_stderr(fake, capsys):
    fake.reset()
    code = bench_main(["--base-url", fake.base_url, "--quiet", "--json", "-", "--concurrency", "1", "--warmup", "0"])
    assert code == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["levels"][0]["ok"] == 2
    assert "TTFT ms" in captured.err


def test_unreachable_server(tmp_path, capsys):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    base = f"http://127.0.0.1:{port}/v1"
    assert bench_main(["--base-url", base, "--quiet"]) == 2
    assert "could not get a model" in capsys.readouterr().err
    path = tmp_path / "r.json"
    code = bench_main(["--base-url", base, "--quiet", "--model", "m", "--concurrency", "1", "--json", str(path)])
    assert code == 1
    lv = json.loads(path.read_text())["levels"][0]
    assert lv["errors"] == 2 and lv["error_messages"][0].startswith("ConnectError")


@pytest.mark.parametrize(
    "args",
    [
        ["--concurrency", "0"],
        ["--concurrency", "1,x"],
        ["--concurrency", ""],
        ["--requests", "0"],
        ["--max-tokens", "-1"],
        ["--timeout", "nan"],
        ["--endpoint", "embeddings"],
        ["--response-format", "no-such-file.json"],
        ["--prompt", "hi", "--prompt-tokens", "5"],
        ["--raw"],
        ["--raw", "--model-path", "m", "--prompt", "hi"],
        ["--model-path", "m"],
        ["--json", "/no/such/dir/out.json"],
    ],
)
def test_bad_arguments_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main(args)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- raw decode


def test_raw_mode_reports_the_engine_decode_rate(monkeypatch, tmp_path, capsys):
    calls: list[tuple] = []
    loaded: list[tuple] = []

    from lmfleet.bench import raw

    def load_model(path, *, dtype, device):
        loaded.append((path, dtype, device))
        return "the-model"

    def raw_decode(model, batch_size, *, prompt_len=20, new_tokens=64):
        calls.append((model, batch_size, prompt_len, new_tokens))
        ids = [[7] * new_tokens for _ in range(batch_size)]
        return raw.RawRun(ids, [[1] * prompt_len] * batch_size, seconds=new_tokens / 100.0)

    monkeypatch.setattr(raw, "load_model", load_model)
    monkeypatch.setattr(raw, "raw_decode", raw_decode)

    path = tmp_path / "raw.json"
    code = bench_main([
        "--raw", "--model-path", "/models/m", "--dtype", "bfloat16", "--concurrency", "1,4",
        "--max-tokens", "32", "--prompt-tokens", "12", "--quiet", "--json", str(path),
    ])  # fmt: skip
    assert code == 0
    assert loaded == [("/models/m", "bfloat16", "cpu")]
    assert calls[1:] == [("the-model", 1, 12, 32), ("the-model", 4, 12, 32)]  # after one short warmup
    report = json.loads(path.read_text())
    assert report["mode"] == "raw" and report["config"]["dtype"] == "bfloat16"
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 4]
    assert [lv["output_tok_s"] for lv in report["levels"]] == [100.0, 400.0]
    assert [lv["output_tokens"] for lv in report["levels"]] == [32, 128]
    assert report["levels"][1]["ttft_ms"] is None
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[0] == "batch" and table[3].split()[:5] == ["4", "4", "0", "128", "400.0"]


# ---------------------------------------------------------------------------------------------- multi-turn


def _conversations(received: list[dict]) -> dict[str, list[dict]]:
    """The requests of each user, in order, by the user's first message."""
    out: dict[str, list[dict]] = {}
    for body in received:
        first = next(m["content"] for m in body["messages"] if m["role"] == "user")
        out.setdefault(first, []).append(body)
    return out


@pytest.mark.parametrize("cached", ["usage", "timings"])
def test_multi_turn_sends_the_growing_history_and_counts_turns_apart(fake, run, capsys, cached):
    cfg = fake.reset(chunks=3, cached=cached)
    args = ("--users", "3", "--turns", "3", "--system-tokens", "50", "--prompt-tokens", "5", "--warmup", "1")
    code, report = run("--multi-turn", *args)
    assert code == 0 and report["mode"] == "multi-turn" and report["levels"] == []
    assert report["config"]["users"] == 3 and report["config"]["turns"] == 3 and "concurrency" not in report["config"]
    warmup, *sent = cfg.received
    assert [m["role"] for m in warmup["messages"]] == ["user"]  # nothing of the conversations' before they start

    conversations = _conversations(sent)
    assert len(conversations) == 3
    systems = {b["messages"][0]["content"] for b in sent}
    assert len(systems) == 1 and len(systems.pop().split()) == 50  # one system prompt, shared
    for bodies in conversations.values():
        assert [len(b["messages"]) for b in bodies] == [2, 4, 6]  # the whole history each turn
        for before, after in zip(bodies, bodies[1:], strict=False):
            assert after["messages"][: len(before["messages"])] == before["messages"]
            assert after["messages"][len(before["messages"])] == {"role": "assistant", "content": "tok0 tok1 tok2 "}
        assert all(b["max_tokens"] == 32 and b["stream"] for b in bodies)  # --multi-turn's default: 32 a turn

    mt = report["multi_turn"]
    assert (mt["users"], mt["turns"], mt["requests"], mt["ok"], mt["errors"]) == (3, 3, 9, 9, 0)
    assert [(t["turn"], t["ok"]) for t in mt["per_turn"]] == [(1, 3), (2, 3), (3, 3)]
    assert mt["first_turn_ttft_ms"]["n"] == 3 and mt["later_turn_ttft_ms"]["n"] == 6
    for q in (mt["first_turn_ttft_ms"], mt["later_turn_ttft_ms"]):
        assert set(q) == {"n", "p50", "p90"} and 0 <= q["p50"] <= q["p90"]
    # the fake says one cached token per message sent: 2, 4 and 6 a turn
    assert [t["cached_tokens"] for t in mt["per_turn"]] == [6, 12, 18] and mt["cached_tokens"] == 36
    assert mt["output_tokens"] == 27 and mt["prompt_tokens"] == 99 and mt["output_tok_s"] > 0 and mt["wall_s"] > 0

    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("3 users x 3 turns: 9 ok, 0 failed") and "cached prompt tokens 36 of 99" in table[0]
    assert table[1].split()[:5] == ["turn", "ok", "err", "prompt", "tok"]
    assert [row.split()[:5] for row in table[2:]] == [
        ["1", "3", "0", "33", "6"],
        ["2", "3", "0", "33", "12"],
        ["3", "3", "0", "33", "18"],
        ["later", "6", "0", "66", "30"],
    ]


def test_multi_turn_without_a_cache_figure_and_a_failed_turn(fake, run, capsys):
    """A server that never says what it cached: no figure (not 0). A failed turn ends that user's conversation."""
    cfg = fake.reset(chunks=2, fail_http={2})
    code, report = run("--multi-turn", "--users", "1", "--turns", "3", "--warmup", "0", "--system-tokens", "0")
    assert code == 0
    mt = report["multi_turn"]
    assert (mt["requests"], mt["ok"], mt["errors"]) == (2, 1, 1) and "boom on request 2" in mt["error_messages"][0]
    assert mt["cached_tokens"] is None and mt["later_turn_ttft_ms"] is None
    assert [m["role"] for m in cfg.received[0]["messages"]] == ["user"]  # --system-tokens 0: no system prompt
    assert "cached prompt tokens - of 11" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args", [("--endpoint", "completions"), ("--no-stream",), ("--raw", "--model-path", "x")], ids=str
)
def test_multi_turn_needs_streamed_chat(args, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main(["--multi-turn", *args])
    assert exc.value.code == 2
    assert "--multi-turn" in capsys.readouterr().err


def test_multi_turn_against_a_real_fleet(smollm2_gguf, tmp_path):
    """lmfleet's own stack on SmolLM2: every turn answered, later prompts longer than first ones (the history), the
    cached tokens read from the usage lmfleet reports."""
    path = tmp_path / "multi.json"
    with Fleet(root=tmp_path) as fleet:
        fleet.controller()
        fleet.worker("worker", smollm2_gguf, "--model-names", "smollm2", "--threads", "1")
        fleet.api()
        fleet.wait_models(1)
        code = bench_main([
            "--base-url", fleet.api_url + "/v1", "--multi-turn", "--users", "2", "--turns", "2",
            "--system-tokens", "40", "--prompt-tokens", "5", "--max-tokens", "8", "--warmup", "0", "--quiet",
            "--json", str(path),
        ])  # fmt: skip
    assert code == 0
    mt = json.loads(path.read_text())["multi_turn"]
    assert (mt["ok"], mt["errors"]) == (4, 0), mt["error_messages"]
    first, second = mt["per_turn"]
    assert first["ok"] == second["ok"] == 2
    assert second["prompt_tokens"] > first["prompt_tokens"] + 2 * 5  # the first turn and its answer came along
    assert mt["first_turn_ttft_ms"]["n"] == mt["later_turn_ttft_ms"]["n"] == 2
    assert mt["cached_tokens"] is not None and 0 <= mt["cached_tokens"] < mt["prompt_tokens"]


def test_raw_mode_against_the_real_engine(tmp_path):
    pytest.importorskip("torch")
    from lmfleet.testmodel import make_test_model

    model_dir = make_test_model(tmp_path / "tiny", size="tiny", seed=0)
    path = tmp_path / "raw.json"
    code = bench_main([
        "--raw", "--model-path", str(model_dir), "--concurrency", "1,2", "--max-tokens", "4",
        "--prompt-tokens", "5", "--warmup", "0", "--quiet", "--json", str(path),
    ])  # fmt: skip
    assert code == 0
    levels = json.loads(path.read_text())["levels"]
    assert [lv["output_tokens"] for lv in levels] == [4, 8]
    assert all(lv["output_tok_s"] > 0 for lv in levels)


def test_importing_bench_does_not_import_torch():
    code = "import sys, lmfleet.bench.main; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
