"""Drills with each part of the fleet on its own network host (Linux network namespaces on one bridge, made by the
test: tests/netns.py): a 3-member etcd cluster (e1-e3), two controllers sharing it (c1, c2), two workers of the tiny
model (w1, w2), an API server (api). Every process binds 0.0.0.0 in its namespace; workers advertise their
host's address. The test process is the client, on the root namespace's end of the bridge, with the official
`openai` client.

Timeouts: heartbeat every 0.5 s, expiry 3 s (the etcd lease); the API server's inter-token timeout 3 s. Streams
are greedy with `ignore_eos`, so a resumed stream must equal the undisturbed answer token for token. The drills
share the fleet and run in order; each leaves it whole. Run with `-s` for the figures. Skipped unless root with
`ip netns` (iproute2) and etcd (etcd-server).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Fleet, wait_until
from tests.etcdserver import EtcdCluster, Member, require_etcd
from tests.netns import Host, Network

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny"
MAX_TOKENS = 150
SECRET = "fleet-on-hosts"
CONTROLLER_PORT, WORKER_PORT, API_PORT = 21001, 21002, 8000


def http(timeout: float = 5) -> httpx.Client:
    return httpx.Client(timeout=timeout, trust_env=False)  # 10.213.0.0/24 is reached directly, never via a proxy


@dataclass
class Hosts:
    net: Network
    etcd: EtcdCluster
    fleet: Fleet
    model_path: Path
    references: dict[str, str] = field(default_factory=dict)

    def host(self, name: str) -> Host:
        return self.net.hosts[name]

    def url(self, name: str) -> str:
        port = {"c": CONTROLLER_PORT, "w": WORKER_PORT, "a": API_PORT}[name[0]]
        return f"http://{self.host(name).address}:{port}"

    def python(self, name: str, part: str, *args: str) -> None:
        self.fleet.add(name, self.host(name).run(sys.executable, "-m", f"lmfleet.{part}", *args))

    def start_controller(self, name: str) -> None:
        self.python(
            name,
            "controller",
            *("--host", "0.0.0.0", "--port", str(CONTROLLER_PORT), "--heartbeat-expiration", "3"),
            *("--registry", self.etcd.url, "--allowed-worker-networks", "10.213.0.0/24"),
        )

    def start_worker(self, name: str) -> None:
        self.python(
            name,
            "worker",
            *("--host", "0.0.0.0", "--port", str(WORKER_PORT), "--worker-address", self.url(name)),
            *("--model-path", str(self.model_path), "--model-names", MODEL, "--heartbeat-interval", "0.5"),
            *("--controller-address", f"{self.url('c1')},{self.url('c2')}"),
        )

    def listed(self, controller: str) -> list[str]:
        with http() as h:
            return sorted(w["address"] for w in h.get(self.url(controller) + "/workers").json()["workers"])

    def api_ready(self) -> dict:
        with http() as h:
            r = h.get(self.url("api") + "/ready")
            return r.json() if r.status_code == 200 else {}

    def alive(self, name: str) -> bool:
        popen = self.fleet.procs[name].popen
        return popen is not None and popen.poll() is None

    def wait(self, check, what: str, timeout: float = 60) -> float:
        start = time.monotonic()
        wait_until(check, timeout=timeout, procs=[p for n, p in self.fleet.procs.items() if self.alive(n)], what=what)
        return time.monotonic() - start

    def log_times(self, proc: str, pattern: str, since: float) -> list[float]:
        out = []
        for line in self.fleet.procs[proc].log.read_text(errors="replace").splitlines():
            stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", line)
            if stamp and re.search(pattern, line):
                t = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if t >= since - 0.001:
                    out.append(t)
        return out


@pytest.fixture(scope="module")
def hosts(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    require_etcd()
    root = tmp_path_factory.mktemp("hosts")
    with Network() as net:
        for name, octet in (("e1", 11), ("e2", 12), ("e3", 13), ("c1", 21), ("c2", 22)):
            net.add(name, octet)
        for name, octet in (("w1", 31), ("w2", 32), ("w3", 33), ("api", 41)):
            net.add(name, octet)
        members = [Member(n, net.hosts[n].address, 2379, 2380) for n in ("e1", "e2", "e3")]
        cluster = EtcdCluster(root / "etcd", members, prefix={m.name: net.hosts[m.name].run() for m in members})
        env = {"OMP_NUM_THREADS": "1", "LMFLEET_REGISTRATION_SECRET": SECRET}
        with cluster, Fleet(root=root, env=env) as fleet:
            h = Hosts(net, cluster, fleet, tiny_models["alpha"])
            h.start_controller("c1")
            h.start_controller("c2")
            h.start_worker("w1")
            h.start_worker("w2")
            h.python(
                "api",
                "api",
                *("--host", "0.0.0.0", "--port", str(API_PORT), "--controller-address", f"{h.url('c1')},{h.url('c2')}"),
                *("--first-token-timeout", "10", "--inter-token-timeout", "3"),
            )
            h.wait(lambda: h.api_ready().get("workers") == 2, "2 workers in the API server's rotation", timeout=180)
            yield h


@pytest.fixture
def whole(hosts: Hosts, request: pytest.FixtureRequest) -> Iterator[Hosts]:
    yield hosts
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(hosts.fleet.logs(), hosts.etcd.logs())


# -- streams ------------------------------------------------------------------------------------------------------


def client(h: Hosts) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=h.url("api") + "/v1",
        api_key="none",
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(trust_env=False, timeout=120),
    )


@dataclass
class Stream:
    text: str = ""
    ids: set[str] = field(default_factory=set)
    tokens: int | None = None
    chunks: int = 0
    error: str | None = None


async def read(c: openai.AsyncOpenAI, prompt: str, out: Stream) -> None:
    try:
        stream = await c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            out.ids.add(chunk.id)
            out.chunks += 1
            for choice in chunk.choices:
                out.text += choice.delta.content or ""
            if chunk.usage is not None:
                out.tokens = chunk.usage.completion_tokens
    except openai.OpenAIError as exc:
        out.error = f"{type(exc).__name__}: {exc}"


async def references(h: Hosts, c: openai.AsyncOpenAI, prompts: list[str]) -> None:
    async def one(prompt: str) -> None:
        if prompt not in h.references:
            reply = await c.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=MAX_TOKENS,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            h.references[prompt] = reply.choices[0].message.content or ""

    await asyncio.gather(*(one(p) for p in prompts))


async def streams_running(c: openai.AsyncOpenAI, prompts: list[str], chunks: int = 10) -> tuple[list, list[Stream]]:
    streams = [Stream() for _ in prompts]
    tasks = [asyncio.create_task(read(c, p, s)) for p, s in zip(prompts, streams, strict=True)]
    deadline = time.monotonic() + 60
    while min(s.chunks for s in streams) < chunks:
        states = [(s.chunks, s.error) for s in streams]
        assert time.monotonic() < deadline and not any(t.done() for t in tasks), f"streams not all running: {states}"
        await asyncio.sleep(0.01)
    return tasks, streams


async def until_gone(h: Hosts, address: str, controllers: tuple[str, ...]) -> float:
    """When (monotonic) no controller lists `address` any more."""
    async with httpx.AsyncClient(timeout=5, trust_env=False) as x:
        while True:
            listed = [w["address"] for c in controllers for w in (await x.get(h.url(c) + "/workers")).json()["workers"]]
            if address not in listed:
                return time.monotonic()
            await asyncio.sleep(0.05)


def lost(h: Hosts, prompts: list[str], streams: list[Stream]) -> list[str]:
    """The prompts whose stream did not come out whole and token-exact."""
    return [
        p
        for p, s in zip(prompts, streams, strict=True)
        if s.error or len(s.ids) != 1 or s.tokens != MAX_TOKENS or s.text != h.references[p]
    ]


# -- drills -------------------------------------------------------------------------------------------------------


def test_every_part_is_on_its_own_host(whole: Hosts) -> None:
    h = whole
    assert h.listed("c1") == h.listed("c2") == [h.url("w1"), h.url("w2")]  # advertised host addresses
    assert len({h.host(n).address for n in ("e1", "e2", "e3", "c1", "c2", "w1", "w2", "api")}) == 8
    for name in ("w1", "w2"):  # they advertise a reachable address: no warning
        assert not h.log_times(name, "cannot reach it", 0)


async def test_a_worker_cut_off_the_network(whole: Hosts) -> None:
    h = whole
    prompts = [f"Cut-off story {i}." for i in range(6)]
    c = client(h)
    await references(h, c, prompts)
    tasks, streams = await streams_running(c, prompts)
    with http() as x:
        on_w1 = x.get(h.url("w1") + "/worker/status").json()["running"]
    cut_at, cut_epoch = time.monotonic(), time.time()
    h.net.cut("w1")
    try:
        dropped = asyncio.create_task(until_gone(h, h.url("w1"), ("c1", "c2")))
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        finished = time.monotonic() - cut_at
        await asyncio.wait_for(dropped, 60)
    finally:
        h.net.mend("w1")
    mended = time.monotonic()
    rejoined = h.wait(
        lambda: h.listed("c1") == h.listed("c2") == [h.url("w1"), h.url("w2")] and h.api_ready().get("workers") == 2,
        "w1 back on both controllers and in the API server's rotation",
    )
    assert time.monotonic() - mended >= rejoined
    ejected = h.log_times("api", "ejected worker " + re.escape(h.url("w1")), cut_epoch)
    resumed = h.log_times("api", "resumed on", cut_epoch)
    assert on_w1 > 0 and ejected and resumed
    assert lost(h, prompts, streams) == []
    print(
        f"\n[hosts: link cut] w1's link down under 6 streams ({on_w1} on w1): the API server ejected it "
        f"{ejected[0] - cut_epoch:.2f}s after the cut (inter-token timeout 3 s), {len(resumed)} stream(s) resumed "
        f"on w2, all 6 token-exact ({finished:.2f}s after the cut), 0 lost; both controllers dropped w1 "
        f"{dropped.result() - cut_at:.2f}s after the cut (its etcd lease, 3 s); with the link back it was on both "
        f"controllers and in rotation again {rejoined:.2f}s later"
    )


async def test_a_controller_and_an_etcd_member_die(whole: Hosts) -> None:
    h = whole
    prompts = [f"Control plane story {i}." for i in range(4)]
    c = client(h)
    await references(h, c, prompts)
    tasks, streams = await streams_running(c, prompts)
    killed = time.monotonic()
    h.fleet.procs["c1"].signal(signal.SIGKILL)
    h.etcd.kill(h.etcd.members[0])
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    assert lost(h, prompts, streams) == []

    h.start_worker("w3")  # a new worker: its registration reaches c2, and through etcd the whole fleet
    joined = h.wait(lambda: h.url("w3") in h.listed("c2"), "w3 registered through c2", timeout=120)
    h.wait(lambda: h.api_ready().get("workers") == 3, "w3 in the API server's rotation")
    time.sleep(max(0.0, killed + 4 - time.monotonic()))  # past a heartbeat expiry: nobody was dropped
    assert h.listed("c2") == [h.url("w1"), h.url("w2"), h.url("w3")]
    with http() as x:
        assert x.get(h.url("c2") + "/ready").json() == {"status": "ready"}  # two of three members: a quorum

    h.fleet.procs["w3"].stop()  # it drains and unregisters
    h.etcd.start(h.etcd.members[0])
    h.start_controller("c1")
    h.wait(lambda: h.listed("c1") == h.listed("c2") == [h.url("w1"), h.url("w2")], "c1 and e1 back")
    print(
        f"\n[hosts: controller + etcd member killed] c1 and e1 kill -9'd under 4 streams: 0 lost, all token-exact; "
        f"a new worker started on a sixth host was listed by c2 {joined:.2f}s after its start (model load included); "
        "no worker dropped"
    )


async def test_every_controller_restarts(whole: Hosts) -> None:
    h = whole
    fleet = [h.url("w1"), h.url("w2")]

    def first_answer(name: str) -> list[str]:
        answer: list[list[str]] = []

        def answered() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                answer.append(h.listed(name))
            return bool(answer)

        h.wait(answered, f"{name} answering")
        return answer[0]

    def loaded_in(name: str) -> float:
        lines = h.fleet.procs[name].log.read_text(errors="replace").splitlines()
        return [float(m.group(1)) for ln in lines if (m := re.search(r"fleet loaded from .* in ([\d.]+)s", ln))][-1]

    # in turn (a deploy): the other controller keeps the leases alive, so each one's first answer is the fleet
    rolling = {}
    for name in ("c1", "c2"):
        h.fleet.procs[name].stop()
        h.start_controller(name)
        assert first_answer(name) == fleet, name
        rolling[name] = loaded_in(name)

    # all at once, under streams: the workers' leases outlive the restart when it is shorter than the expiry;
    # otherwise the workers register again at their next heartbeat
    prompts = [f"Restart story {i}." for i in range(4)]
    c = client(h)
    await references(h, c, prompts)
    tasks, streams = await streams_running(c, prompts)
    for name in ("c1", "c2"):
        h.fleet.procs[name].stop()
    stopped = time.monotonic()
    for name in ("c1", "c2"):
        h.start_controller(name)
    first = {name: (first_answer(name), time.monotonic() - stopped) for name in ("c1", "c2")}
    whole_again = h.wait(lambda: h.listed("c1") == h.listed("c2") == fleet, "the fleet listed again")
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    assert lost(h, prompts, streams) == []
    h.wait(lambda: h.api_ready().get("controller") == "up", "the API server on the controllers again")
    print(
        "\n[hosts: every controller restarted] in turn: each one's first answer listed the whole fleet, read from "
        "etcd " + ", ".join(f"{n} in {t:.3f}s" for n, t in rolling.items()) + " after its app started; all at "
        "once under 4 streams (0 lost): "
        + ", ".join(
            f"{n} answered {t:.2f}s after the stop listing {len(ws)} of 2 workers" for n, (ws, t) in first.items()
        )
        + f", the whole fleet listed {whole_again:.2f}s after the second one answered"
    )
