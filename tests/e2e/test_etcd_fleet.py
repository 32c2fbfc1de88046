"""Several controllers on one etcd serve one fleet: real etcd, real controller processes (`--registry etcd://`), a real
worker (the tiny model) and registrations over plain HTTP, on loopback.

The fleet: etcd (one member), controllers c1 and c2 (heartbeat expiry 3 s, a registration secret), a worker that
knows only c1 (heartbeat every 0.5 s). The tests run in this order and share it. Run with `-s` for the figures.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.conftest import Fleet, free_port, module_cmd, wait_until
from tests.etcdserver import EtcdCluster

pytestmark = pytest.mark.timeout(180)

SECRET = "etcd-fleet-secret"
AUTH = {"Authorization": f"Bearer {SECRET}"}
FAKE = "http://10.9.0.1:21002"  # a registration made by hand: nothing listens there


@dataclass
class Shared:
    etcd: EtcdCluster
    fleet: Fleet
    ports: dict[str, int]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start_controller(self, name: str) -> None:
        self.ports.setdefault(name, free_port())
        cmd = module_cmd(
            "controller",
            *("--port", str(self.ports[name]), "--heartbeat-expiration", "3", "--registry", self.etcd.url),
        )
        self.fleet.add(name, cmd)

    def workers(self, name: str) -> list[str]:
        r = httpx.get(self.url(name) + "/workers", timeout=5)
        assert r.status_code == 200, r.text
        return [w["address"] for w in r.json()["workers"]]

    def worker_status(self, name: str, address: str) -> dict:
        r = httpx.get(self.url(name) + "/workers", timeout=5)
        return next(w["status"] for w in r.json()["workers"] if w["address"] == address)

    def wait(self, check, what: str, timeout: float = 60) -> float:
        start = time.monotonic()
        wait_until(check, timeout=timeout, procs=[], what=what)
        return time.monotonic() - start

    def log_lines(self, proc: str, pattern: str) -> list[str]:
        lines = self.fleet.procs[proc].log.read_text(errors="replace").splitlines()
        return [ln for ln in lines if re.search(pattern, ln)]


@pytest.fixture(scope="module")
def shared(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    root = tmp_path_factory.mktemp("etcd-fleet")
    env = {"OMP_NUM_THREADS": "1", "LMFLEET_REGISTRATION_SECRET": SECRET}
    with EtcdCluster.local(root / "etcd") as etcd, Fleet(root=root, env=env) as fleet:
        s = Shared(etcd, fleet, {})
        s.start_controller("c1")
        s.start_controller("c2")
        fleet.controller_port = s.ports["c1"]  # the worker knows only c1
        s.ports["w"] = free_port()
        fleet.worker("w", tiny_models["alpha"], "--model-names", "tiny", port=s.ports["w"])
        wait_until(lambda: s.workers("c1") == [s.url("w")], timeout=120, procs=list(fleet.procs.values()), what="w")
        yield s


@pytest.fixture(autouse=True)
def logs_on_failure(shared: Shared, request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(shared.fleet.logs(), shared.etcd.logs())


def register(s: Shared, controller: str, address: str, **status) -> httpx.Response:
    body = {"worker_name": address, "worker_status": {"model_names": ["tiny"], **status}}
    return httpx.post(s.url(controller) + "/register_worker", json=body, headers=AUTH, timeout=10)


def test_a_worker_registered_with_one_controller_is_listed_by_the_other(shared: Shared) -> None:
    s = shared
    s.wait(lambda: s.workers("c2") == [s.url("w")], "c2 listing w")
    assert s.worker_status("c2", s.url("w"))["model_names"] == ["tiny"]
    for c in ("c1", "c2"):
        assert httpx.get(s.url(c) + "/ready").json() == {"status": "ready"}
        assert httpx.post(s.url(c) + "/get_worker_address", json={"model": "tiny"}).json() == {"address": s.url("w")}

    # the registration secret applies as before, on every controller
    assert httpx.post(s.url("c2") + "/register_worker", json={"worker_name": FAKE}).status_code == 401
    assert register(s, "c2", FAKE, queue_length=1).status_code == 200
    s.wait(lambda: FAKE in s.workers("c1"), "c1 listing a registration made on c2")
    # the load a heartbeat reports on c1 reaches c2
    beat = {"worker_name": FAKE, "worker_status": {"model_names": ["tiny"], "running": 4, "queue_length": 4}}
    assert httpx.post(s.url("c1") + "/receive_heart_beat", json=beat, headers=AUTH).json() == {"exist": True}
    s.wait(lambda: s.worker_status("c2", FAKE)["running"] == 4, "the load reaching c2")
    resp = httpx.post(s.url("c2") + "/unregister_worker", json={"worker_name": FAKE}, headers=AUTH)
    assert resp.json() == {"removed": True}
    s.wait(lambda: s.workers("c1") == [s.url("w")], "the unregistration reaching c1")


def test_a_controller_that_starts_knows_the_fleet_at_once(shared: Shared) -> None:
    s = shared
    started = time.monotonic()
    s.start_controller("c3")
    proc = s.fleet.procs["c3"]

    first: list[str] = []

    def answers() -> bool:
        first.extend(s.workers("c3"))
        return True

    wait_until(answers, timeout=60, procs=[proc], what="c3 answering")
    answered = time.monotonic() - started
    assert first == [s.url("w")]  # its very first answer lists the fleet: no waiting for heartbeats
    assert httpx.get(s.url("c3") + "/ready").json() == {"status": "ready"}
    print(f"\n[etcd] a new controller's first /workers answer ({answered:.2f}s after its start) listed the fleet")


def test_with_etcd_down_controllers_serve_the_last_view_and_registrations_resume_after(shared: Shared) -> None:
    s = shared
    etcd = s.etcd.members[0]
    down_at = time.time()
    s.etcd.kill(etcd)

    def not_ready(c: str) -> bool:
        r = httpx.get(s.url(c) + "/ready", timeout=5)
        return r.status_code == 503 and "etcd unreachable" in r.json()["error"]["message"]

    noticed = s.wait(lambda: not_ready("c1") and not_ready("c2"), "the controllers noticing")
    for c in ("c1", "c2", "c3"):
        assert s.workers(c) == [s.url("w")]  # the last view keeps answering
        assert httpx.post(s.url(c) + "/get_worker_address", json={"model": "tiny"}).json()["address"] == s.url("w")
    refused = register(s, "c2", FAKE)
    assert refused.status_code == 503 and "etcd unreachable" in refused.json()["error"]["message"]
    # a controller (re)started during the outage has no view: it says so rather than list an empty fleet
    s.fleet.procs["c3"].stop()
    s.start_controller("c3")
    s.wait(lambda: httpx.get(s.url("c3") + "/health").status_code == 200, "c3 answering")
    unknown = httpx.get(s.url("c3") + "/workers")
    assert unknown.status_code == 503 and "not been read from etcd yet" in unknown.json()["error"]["message"]
    time.sleep(1)  # the worker's heartbeats are refused meanwhile; it keeps retrying

    back_at = time.time()
    s.etcd.start(etcd)
    back = s.wait(lambda: not not_ready("c1") and not not_ready("c2"), "the controllers ready again")
    resumed = s.wait(lambda: register(s, "c2", FAKE).status_code == 200, "registrations taken again")
    s.wait(lambda: FAKE in s.workers("c1"), "c1 seeing the new registration")

    def worker_registered_again() -> bool:
        stamps = [ln for ln in s.log_lines("w", r"registered .* with controller") if _epoch(ln) >= back_at]
        return bool(stamps)

    s.wait(worker_registered_again, "w registering again through its heartbeat loop")
    for c in ("c1", "c2"):  # one warning for the outage and one line for the recovery, not one per request
        assert len([ln for ln in s.log_lines(c, "etcd unreachable") if _epoch(ln) >= down_at]) == 1
        assert len([ln for ln in s.log_lines(c, "etcd reachable again") if _epoch(ln) >= down_at]) == 1
        assert not s.log_lines(c, "request failed")
    assert httpx.post(s.url("c1") + "/unregister_worker", json={"worker_name": FAKE}, headers=AUTH).status_code == 200
    print(
        f"\n[etcd down] both controllers' /ready said why {noticed:.2f}s after etcd was killed and kept listing the "
        f"fleet; after etcd restarted they were ready in {back:.2f}s and took registrations {resumed:.2f}s later"
    )


def test_a_killed_worker_leaves_every_controller(shared: Shared) -> None:
    s = shared
    s.wait(lambda: all(s.workers(c) == [s.url("w")] for c in ("c1", "c2", "c3")), "w listed everywhere")
    killed = time.monotonic()
    s.fleet.procs["w"].signal(signal.SIGKILL)
    gone = {}
    while len(gone) < 3 and time.monotonic() - killed < 60:
        for c in ("c1", "c2", "c3"):
            if c not in gone and not s.workers(c):
                gone[c] = time.monotonic() - killed
        time.sleep(0.05)
    assert len(gone) == 3, gone
    print(
        "\n[etcd] kill -9 of a worker: gone from the three controllers "
        + ", ".join(f"{c} {t:.2f}s" for c, t in sorted(gone.items()))
        + " after the kill (heartbeat expiry 3 s: its etcd lease)"
    )


def _epoch(line: str) -> float:
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", line)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else 0.0
