"""Drills on a real fleet on loopback: nothing is lost when a worker or the controller dies.

One controller (heartbeat expiry 3 s), two workers of the same tiny model served under one name (heartbeat every
0.5 s), one API server (first-token timeout 10 s, inter-token timeout 3 s). Streams use greedy decoding and
`ignore_eos` so they are long enough to interrupt, and every stream's first chunk is in hand before anything is
killed. The drills run in this order and share the fleet; a killed worker is restarted on its port before the
next drill. What each drill measured (times to eject, resume, re-register, drain) is printed: run with `-s`.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.conftest import Fleet, free_port, wait_until

pytestmark = pytest.mark.timeout(180)

MODEL = "tiny"
MAX_TOKENS = 150
DRAIN_TOKENS = 400  # the drain drills' streams must outlast their probes of the draining process
INTER_TOKEN_TIMEOUT_S = 3


@dataclass
class Drill:
    fleet: Fleet
    model_path: Path
    ports: dict[str, int]
    references: dict[str, str] = field(default_factory=dict)  # prompt -> undisturbed greedy text

    def worker_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start_worker(self, name: str) -> None:
        self.fleet.worker(name, self.model_path, "--model-names", MODEL, port=self.ports[name])

    def alive(self, name: str) -> bool:
        popen = self.fleet.procs[name].popen
        return popen is not None and popen.poll() is None


@pytest.fixture(scope="module")
def drill(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    with Fleet(root=tmp_path_factory.mktemp("resilience"), env={"OMP_NUM_THREADS": "1"}) as f:
        d = Drill(f, tiny_models["alpha"], {"w1": free_port(), "w2": free_port()})
        f.controller()
        d.start_worker("w1")
        d.start_worker("w2")
        f.api("--first-token-timeout", "10", "--inter-token-timeout", str(INTER_TOKEN_TIMEOUT_S))
        f.wait_models(1)
        yield d


@pytest.fixture
def fleet_whole(drill: Drill, request: pytest.FixtureRequest) -> Iterator[Drill]:
    """Before a drill: both workers running, registered and in the API server's rotation."""
    for name in ("w1", "w2"):
        if not drill.alive(name):
            drill.start_worker(name)
    procs = list(drill.fleet.procs.values())
    wait_until(lambda: ready(drill.fleet).get("workers") == 2, timeout=90, procs=procs, what="2 workers in rotation")
    yield drill
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(drill.fleet.logs())


def ready(fleet: Fleet) -> dict:
    r = httpx.get(fleet.api_url + "/ready", timeout=5)
    return r.json() if r.status_code == 200 else {}


def body(prompt: str, *, stream: bool = True, max_tokens: int = MAX_TOKENS) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }


@dataclass
class Stream:
    """What a client saw of one streamed answer."""

    text: str = ""
    ids: set[str] = field(default_factory=set)
    finish: str | None = None
    usage: dict | None = None
    errors: list[dict] = field(default_factory=list)
    done: bool = False
    times: list[float] = field(default_factory=list)  # monotonic arrival of each content chunk
    first: asyncio.Event = field(default_factory=asyncio.Event)

    def longest_pause_after(self, t: float) -> float:
        """The longest wait for a content chunk after `t` (from `t`, or from the previous chunk)."""
        times = [t] + [x for x in self.times if x > t]
        return max((b - a for a, b in zip(times[:-1], times[1:], strict=True)), default=0.0)


async def read_stream(http: httpx.AsyncClient, url: str, req: dict, out: Stream, *, hang_up: bool = False) -> Stream:
    async with http.stream("POST", url + "/v1/chat/completions", json=req) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                out.done = True
                break
            event = json.loads(data)
            if "error" in event:
                out.errors.append(event["error"])
                continue
            out.ids.add(event["id"])
            out.usage = event.get("usage") or out.usage
            for choice in event["choices"]:
                out.text += choice["delta"].get("content") or ""
                out.finish = choice["finish_reason"] or out.finish
                if choice["delta"].get("content"):
                    out.times.append(time.monotonic())
                    out.first.set()
                    if hang_up:
                        return out
    return out


async def until(check: Callable[[], Awaitable[bool]], *, timeout: float, what: str) -> float:
    """Poll `check` without blocking the event loop; the seconds it took. The timeout only bounds a hang."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if await check():
                return time.monotonic() - start
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


async def references(
    drill: Drill, http: httpx.AsyncClient, prompts: list[str], *, max_tokens: int = MAX_TOKENS
) -> dict[str, str]:
    """Each prompt's greedy answer from an undisturbed run (non-streamed), computed once per prompt."""
    missing = [p for p in prompts if p not in drill.references]

    async def one(prompt: str) -> str:
        req = body(prompt, stream=False, max_tokens=max_tokens)
        r = await http.post(drill.fleet.api_url + "/v1/chat/completions", json=req)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == max_tokens
        return r.json()["choices"][0]["message"]["content"]

    for prompt, text in zip(missing, await asyncio.gather(*(one(p) for p in missing)), strict=True):
        drill.references[prompt] = text
    return {p: drill.references[p] for p in prompts}


def log_lines(drill: Drill, proc: str, pattern: str, since: float) -> list[tuple[float, str]]:
    """(epoch seconds, line) of the process's log lines matching `pattern` logged at or after `since`."""
    out = []
    for line in drill.fleet.procs[proc].log.read_text(errors="replace").splitlines():
        stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", line)
        if stamp and re.search(pattern, line):
            t = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if t >= since - 0.001:
                out.append((t, line))
    return out


def assert_complete(stream: Stream, reference: str, *, max_tokens: int = MAX_TOKENS) -> None:
    assert stream.done and not stream.errors, stream.errors
    assert len(stream.ids) == 1  # one answer, one id
    assert stream.finish == "length"
    assert stream.usage is not None and stream.usage["completion_tokens"] == max_tokens
    assert stream.text == reference  # greedy: resumed text == undisturbed text


async def start_streams(
    drill: Drill, http: httpx.AsyncClient, prompts: list[str], *, chunks: int = 1, max_tokens: int = MAX_TOKENS
) -> tuple[list, list[Stream]]:
    """Start one stream per prompt; return once every stream has sent `chunks` content chunks."""
    streams = [Stream() for _ in prompts]
    tasks = [
        asyncio.create_task(read_stream(http, drill.fleet.api_url, body(p, max_tokens=max_tokens), s))
        for p, s in zip(prompts, streams, strict=True)
    ]
    await asyncio.wait_for(asyncio.gather(*(s.first.wait() for s in streams)), 60)
    while min(len(s.times) for s in streams) < chunks:
        await asyncio.sleep(0.01)
    assert not any(t.done() for t in tasks), "a stream finished before the drill: make them longer"
    return tasks, streams


def resumed_after(lines: list[tuple[float, str]]) -> list[int]:
    """The token counts the API server's "resumed ... after N token(s)" lines report."""
    return sorted(int(m.group(1)) for _, line in lines if (m := re.search(r"after (\d+) token", line)))


# ---------------------------------------------------------------------------------------------------------------


async def test_clients_hanging_up_free_their_sequences(fleet_whole: Drill) -> None:
    drill = fleet_whole
    async with httpx.AsyncClient(timeout=60) as http:
        streams = [Stream() for _ in range(16)]
        req = body("Talk until I leave.", max_tokens=400)
        await asyncio.gather(*(read_stream(http, drill.fleet.api_url, req, s, hang_up=True) for s in streams))
        assert all(s.text and not s.done for s in streams)

        async def all_idle() -> bool:
            for name in ("w1", "w2"):
                status = (await http.get(drill.worker_url(name) + "/worker/status")).json()
                if status["running"] or status["waiting"]:
                    return False
            return True

        freed = await until(all_idle, timeout=30, what="running count back to 0")
        start = time.monotonic()
        fresh = Stream()
        task = asyncio.create_task(read_stream(http, drill.fleet.api_url, body("Fresh start."), fresh))
        await asyncio.wait_for(fresh.first.wait(), 30)
        ttft = time.monotonic() - start
        await task
        assert fresh.done and fresh.finish == "length"
    print(
        f"\n[hang-ups] 16 clients left after their first token: both workers' running count was 0 "
        f"{freed:.2f}s after the last one left; a fresh request's first token came {ttft:.2f}s after it was sent"
    )


async def test_kill_9_a_worker_mid_stream(fleet_whole: Drill) -> None:
    drill = fleet_whole
    prompts = [f"Story number {i}, please." for i in range(8)]
    async with httpx.AsyncClient(timeout=120) as http:
        refs = await references(drill, http, prompts)
        tasks, streams = await start_streams(drill, http, prompts, chunks=10)
        killed_at, killed_epoch = time.monotonic(), time.time()
        drill.fleet.procs["w1"].signal(signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)

    for prompt, stream in zip(prompts, streams, strict=True):
        assert_complete(stream, refs[prompt])
    resumed = log_lines(drill, "api", r"resumed on", killed_epoch)
    ejected = log_lines(drill, "api", r"ejected worker " + re.escape(drill.worker_url("w1")), killed_epoch)
    assert resumed and ejected  # the streams on w1 went on elsewhere
    pauses = sorted(s.longest_pause_after(killed_at) for s in streams)
    print(
        f"\n[kill -9] 8 streams, {len(resumed)} resumed on w2 (after {resumed_after(resumed)} tokens): w1 ejected "
        f"{ejected[0][0] - killed_epoch:.3f}s after the kill; longest pause per stream after the kill "
        f"{pauses[0]:.3f}-{pauses[-1]:.3f}s; all texts equal the undisturbed greedy run"
    )

    drill.start_worker("w1")
    async with httpx.AsyncClient(timeout=10) as http:

        async def started() -> bool:
            return (await http.get(drill.worker_url("w1") + "/ready")).status_code == 200

        loaded = await until(started, timeout=90, what="w1 started again")

        async def in_rotation() -> bool:
            return (await http.get(drill.fleet.api_url + "/ready")).json().get("workers") == 2

        rotation = await until(in_rotation, timeout=30, what="w1 back in rotation")
    print(
        f"[kill -9] w1 restarted on its port: ready after {loaded:.2f}s (process start and model load), back in "
        f"the API server's rotation {rotation:.2f}s later (registration + the API server's next refresh)"
    )


async def test_the_fleet_serves_while_the_controller_is_down(fleet_whole: Drill) -> None:
    drill = fleet_whole
    fleet = drill.fleet
    fleet.procs["controller"].signal(signal.SIGKILL)
    fleet.procs["controller"].popen.wait(10)
    async with httpx.AsyncClient(timeout=120) as http:

        async def api_sees_it_down() -> bool:
            return (await http.get(fleet.api_url + "/ready")).json().get("controller") == "down"

        noticed = await until(api_sees_it_down, timeout=30, what="the API server noticing")
        models = (await http.get(fleet.api_url + "/v1/models")).json()
        assert [m["id"] for m in models["data"]] == [MODEL]
        prompts = [f"While the controller is away {i}." for i in range(4)]
        answers = await asyncio.gather(
            *(http.post(fleet.api_url + "/v1/chat/completions", json=body(p, stream=False)) for p in prompts)
        )
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        streams = [Stream() for _ in range(2)]
        await asyncio.gather(
            *(read_stream(http, fleet.api_url, body(p), s) for p, s in zip(prompts[:2], streams, strict=True))
        )
        for answer, stream in zip(answers[:2], streams, strict=True):
            assert stream.done and stream.finish == "length" and not stream.errors
            assert stream.text == answer.json()["choices"][0]["message"]["content"]

        restarted = time.monotonic()
        fleet.controller()

        async def controller_up() -> bool:
            return (await http.get(fleet.controller_url + "/health")).status_code == 200

        async def workers_listed() -> bool:
            return len((await http.get(fleet.controller_url + "/workers")).json()["workers"]) == 2

        async def api_sees_it_up() -> bool:
            return (await http.get(fleet.api_url + "/ready")).json().get("controller") == "up"

        up = await until(controller_up, timeout=60, what="controller up")
        relisted = await until(workers_listed, timeout=30, what="workers re-registered")
        api_up = await until(api_sees_it_up, timeout=30, what="the API server using the controller again")
    total = time.monotonic() - restarted
    print(
        f"\n[controller down] the API server noticed after {noticed:.2f}s and served 4 requests + 2 streams "
        f"from its cached view; restarted controller answered after {up:.2f}s, both workers listed again "
        f"{relisted:.2f}s later, API server on it again {api_up:.2f}s later ({total:.2f}s in all)"
    )


async def test_a_frozen_worker_is_left_by_the_timeouts(fleet_whole: Drill) -> None:
    drill = fleet_whole
    prompts = [f"Frozen tale {i}." for i in range(4)]
    w1 = drill.fleet.procs["w1"]
    async with httpx.AsyncClient(timeout=120) as http:
        refs = await references(drill, http, prompts)
        tasks, streams = await start_streams(drill, http, prompts, chunks=10)
        try:
            stopped_at, stopped_epoch = time.monotonic(), time.time()
            w1.signal(signal.SIGSTOP)
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
            finished = time.monotonic() - stopped_at
        finally:
            w1.signal(signal.SIGCONT)
        for prompt, stream in zip(prompts, streams, strict=True):
            assert_complete(stream, refs[prompt])
        resumed = log_lines(drill, "api", r"resumed on", stopped_epoch)
        ejected = log_lines(drill, "api", r"ejected worker " + re.escape(drill.worker_url("w1")), stopped_epoch)
        assert resumed and ejected and "sent nothing" in ejected[0][1]
        pauses = sorted(s.longest_pause_after(stopped_at) for s in streams)

        async def back() -> bool:
            return (await http.get(drill.fleet.api_url + "/ready")).json().get("workers") == 2

        readmitted = await until(back, timeout=60, what="w1 back in rotation after SIGCONT")
    print(
        f"\n[SIGSTOP] w1 frozen under 4 streams: ejected {ejected[0][0] - stopped_epoch:.2f}s after the stop "
        f"(inter-token timeout {INTER_TOKEN_TIMEOUT_S}s), {len(resumed)} stream(s) resumed on w2 (after "
        f"{resumed_after(resumed)} tokens); longest pause per stream {pauses[0]:.2f}-{pauses[-1]:.2f}s; "
        f"all 4 done {finished:.2f}s after the stop; after SIGCONT w1 was back in rotation in {readmitted:.2f}s"
    )


async def test_sigterm_drains_a_worker(fleet_whole: Drill) -> None:
    drill = fleet_whole
    fleet = drill.fleet
    prompts = [f"Finish this one {i}." for i in range(4)]
    w1 = fleet.procs["w1"]
    async with httpx.AsyncClient(timeout=120) as http:
        # long streams: they must outlast the drill's probes of the draining worker
        refs = await references(drill, http, prompts, max_tokens=DRAIN_TOKENS)
        tasks, streams = await start_streams(drill, http, prompts, max_tokens=DRAIN_TOKENS)
        on_w1 = (await http.get(drill.worker_url("w1") + "/worker/status")).json()["running"]
        term_at, term_epoch = time.monotonic(), time.time()
        w1.signal(signal.SIGTERM)

        async def unlisted() -> bool:
            workers = (await http.get(fleet.controller_url + "/workers")).json()["workers"]
            return drill.worker_url("w1") not in {w["address"] for w in workers}

        left = await until(unlisted, timeout=30, what="w1 leaving the controller")
        # Taking nothing new: a 503 while it finishes its streams, or no answer once they are done and it exits
        # (the tiny model can finish them before these probes are read).
        for probe in (
            http.post(drill.worker_url("w1") + "/worker/generate", json={"request_id": "direct", "prompt": "hi"}),
            http.get(drill.worker_url("w1") + "/ready"),
        ):
            try:
                assert (await probe).status_code == 503
            except httpx.TransportError:
                await until(lambda: asyncio.sleep(0, w1.popen.poll() is not None), timeout=30, what="w1 exit")
        news = await asyncio.gather(
            *(
                http.post(fleet.api_url + "/v1/chat/completions", json=body(f"New {i}", stream=False, max_tokens=8))
                for i in range(4)
            )
        )
        assert all(r.status_code == 200 for r in news), [r.text for r in news]
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        streams_done = time.monotonic() - term_at
        await until(lambda: asyncio.sleep(0, w1.popen.poll() is not None), timeout=60, what="w1 exit")
        exited = time.monotonic() - term_at
    for prompt, stream in zip(prompts, streams, strict=True):
        assert_complete(stream, refs[prompt], max_tokens=DRAIN_TOKENS)
    assert not log_lines(drill, "api", r"resumed on", term_epoch)  # finished where they ran
    assert on_w1 > 0
    print(
        f"\n[SIGTERM worker] {on_w1} stream(s) running on w1: it left the controller {left:.2f}s after SIGTERM "
        f"and answered new requests 503 (4 new ones were served by w2); its streams were done {streams_done:.2f}s "
        f"after SIGTERM, without a resume; it exited {exited:.2f}s after SIGTERM"
    )


async def test_sigterm_drains_the_api_server(fleet_whole: Drill) -> None:
    drill = fleet_whole
    fleet = drill.fleet
    api = fleet.procs["api"]
    async with httpx.AsyncClient(timeout=120) as http:
        refs = await references(drill, http, ["Last words."], max_tokens=DRAIN_TOKENS)
        tasks, (stream,) = await start_streams(drill, http, ["Last words."], max_tokens=DRAIN_TOKENS)
        term_at = time.monotonic()
        api.signal(signal.SIGTERM)
        await asyncio.sleep(0.05)  # the drain starts at once; the stream must still be running after this
        refused = await http.post(fleet.api_url + "/v1/chat/completions", json=body("Too late.", stream=False))
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable_error"
        assert (await http.get(fleet.api_url + "/ready")).status_code == 503
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        await until(lambda: asyncio.sleep(0, api.popen.poll() is not None), timeout=30, what="api exit")
    assert_complete(stream, refs["Last words."], max_tokens=DRAIN_TOKENS)
    print(
        f"\n[SIGTERM API server] refused new requests (503) while its stream finished; exited "
        f"{time.monotonic() - term_at:.2f}s after SIGTERM"
    )
