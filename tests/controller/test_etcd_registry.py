"""The etcd registry backend in process, against a real etcd on loopback: several registries (one per controller)
on one etcd share one fleet; settings parsing without etcd."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace

import aetcd
import pytest

from lmfleet import errors
from lmfleet.controller.etcd import EtcdRegistry, EtcdSettings, channel_target
from lmfleet.controller.registry import RegistryUnavailable
from lmfleet.protocol.worker import ModelState, WorkerStatus
from tests.conftest import free_port
from tests.etcdserver import Certificates, EtcdCluster

pytestmark = pytest.mark.timeout(120)

A = "http://10.0.0.1:21002"
B = "http://10.0.0.2:21002"
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with EtcdCluster.local(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture
def prefix() -> str:
    """Each test its own fleet."""
    return f"/test/{next(_prefixes)}/"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def registry(
    etcd: EtcdCluster, prefix: str, *, expiry_s: float = 30.0, clock: FakeClock | None = None
) -> AsyncIterator[EtcdRegistry]:
    settings = EtcdSettings.from_url(etcd.url, prefix=prefix, probe_interval_s=0.2)
    reg = EtcdRegistry(settings, expiry_s, clock=clock or FakeClock())
    async with reg.running():
        yield reg


async def eventually(check, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def status(*models: str, **kw) -> WorkerStatus:
    return WorkerStatus(model_names=list(models), **kw)


# -- settings ---------------------------------------------------------------------------------------------------


def test_settings_from_url() -> None:
    s = EtcdSettings.from_url("etcd://10.1.0.1:2379,etcd-2,[fd00::3]:12379/")
    assert s.endpoints == [("10.1.0.1", 2379), ("etcd-2", 2379), ("fd00::3", 12379)]
    assert s.prefix == "/lmfleet/workers/" and not s.tls
    for bad in ("http://h:2379", "etcd://", "etcd://h:notaport", "etcd://h:2379/path", "etcd://u:p@h:2379"):
        with pytest.raises(ValueError):
            EtcdSettings.from_url(bad)
    with pytest.raises(ValueError, match="both a user and a password"):
        EtcdSettings.from_url("etcd://h", user="root")
    with pytest.raises(ValueError, match="not a file"):
        EtcdSettings.from_url("etcd://h", ca_file="/nonexistent/ca.pem")


def test_settings_never_show_the_password() -> None:
    s = EtcdSettings.from_url("etcd://h:1,k:2", user="root", password="pa55-w0rd-secret")
    assert "pa55-w0rd-secret" not in str(s) and "pa55-w0rd-secret" not in repr(s)
    assert str(s) == "etcd://h:1,k:2 prefix=/lmfleet/workers/ tls=off user=root"


async def test_channel_target_lists_every_member() -> None:
    assert await channel_target([("etcd.internal", 2379)]) == "etcd.internal:2379"
    assert await channel_target([("10.0.0.1", 1), ("10.0.0.2", 2)]) == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert await channel_target([("::1", 1), ("fd00::2", 2)]) == "ipv6:[::1]:1,[fd00::2]:2"
    assert await channel_target([("localhost", 1), ("localhost", 2)]) in (  # names are resolved
        "ipv4:127.0.0.1:1,127.0.0.1:2",
        "ipv6:[::1]:1,[::1]:2",
    )
    with pytest.raises(ValueError):
        await channel_target([("::1", 1), ("10.0.0.2", 2)])


# -- against etcd -----------------------------------------------------------------------------------------------


async def test_registries_on_one_etcd_share_the_fleet(etcd: EtcdCluster, prefix: str) -> None:
    async with registry(etcd, prefix) as one, registry(etcd, prefix) as two:
        info = await one.register(A, status("m", queue_length=1))
        assert info.address == A and [w.address for w in one.all()] == [A]  # the writer sees it at once
        await eventually(lambda: [w.address for w in two.all()] == [A])
        await two.register(B, status("m", "n"))
        await eventually(lambda: [w.address for w in one.workers_for("m")] == [A, B])
        assert one.models() == two.models() == ["m", "n"]

        # a heartbeat on either controller carries the load to both
        assert await two.heartbeat(A, status("m", running=3, waiting=2, queue_length=5))
        await eventually(lambda: one.workers_for("m")[0].status.queue_length == 5)
        assert one.workers_for("m")[0].status.running == 3
        assert await one.heartbeat(A, 7)  # FastChat: a queue length only
        await eventually(lambda: two.workers_for("m")[0].status == status("m", queue_length=7))

        assert await one.unregister(B) is True
        await eventually(lambda: [w.address for w in two.all()] == [A])
        assert await two.unregister(B) is False
        assert await two.heartbeat(B, status("m")) is False  # forgotten everywhere: it must register again
        assert one.problem is None and two.problem is None


async def test_the_models_states_travel_through_etcd(etcd: EtcdCluster, prefix: str) -> None:
    models = [
        ModelState(name="m1", state="loaded", memory_bytes=3 << 30, load_seconds=4.5, pinned=True, context_length=8),
        ModelState(name="m2", state="loading", engine="llamacpp", tasks=["generate", "embed"]),
        ModelState(name="m3", state="failed"),
    ]
    sent = status("m1", "m2", "m3", models=models, memory_budget_bytes=8 << 30)
    async with registry(etcd, prefix) as one, registry(etcd, prefix) as two:
        await one.register(A, sent)
        await eventually(lambda: [w.status for w in two.all()] == [sent])
        later = sent.model_copy(update={"models": [m.model_copy(update={"state": "unloaded"}) for m in models]})
        assert await two.heartbeat(A, later)
        await eventually(lambda: [w.status for w in one.all()] == [later])
        assert one.models() == ["m1", "m2", "m3"]


async def test_a_worker_that_stops_beating_leaves_every_registry_when_its_lease_expires(
    etcd: EtcdCluster, prefix: str
) -> None:
    async with registry(etcd, prefix, expiry_s=2) as one, registry(etcd, prefix, expiry_s=2) as two:
        assert one.ttl(status("m")) == 2
        assert one.ttl(status("m").model_copy(update={"protocol": "fastchat"})) == 90  # FastChat's 45 s beats
        await one.register(A, status("m"))
        await one.register(B, status("m"))
        await eventually(lambda: len(two.all()) == 2)
        for _ in range(6):  # B keeps beating, on either controller, for longer than its lease
            await asyncio.sleep(0.5)
            assert await two.heartbeat(B, status("m"))
        assert [w.address for w in one.all()] == [w.address for w in two.all()] == [B]
        assert await one.heartbeat(A, status("m")) is False
        assert await one.expire() == []  # etcd expires workers, not the controller


async def test_a_registry_that_starts_knows_the_fleet_at_once(etcd: EtcdCluster, prefix: str) -> None:
    async with registry(etcd, prefix) as one:
        await one.register(A, status("m"))
        await one.register(B, status("n"))
        async with registry(etcd, prefix) as late:
            assert [w.address for w in late.all()] == [A, B]  # registration order, before any heartbeat
            assert late.models() == ["m", "n"] and late.problem is None


async def test_last_heartbeat_is_when_this_controller_learnt_of_it(etcd: EtcdCluster, prefix: str) -> None:
    clock_one, clock_two = FakeClock(), FakeClock()
    clock_two.now = 5000.0
    async with registry(etcd, prefix, clock=clock_one) as one, registry(etcd, prefix, clock=clock_two) as two:
        await one.register(A, status("m"))
        await eventually(lambda: bool(two.all()))
        assert one.all()[0].last_heartbeat == 100.0 and two.all()[0].last_heartbeat == 5000.0
        clock_one.now, clock_two.now = 101.0, 5001.0
        await one.heartbeat(A, status("m"))
        await eventually(lambda: two.all()[0].last_heartbeat == 5001.0)  # the API server sees it beat again


async def test_foreign_keys_under_the_prefix_are_ignored(
    etcd: EtcdCluster, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = etcd.members[0].host, etcd.members[0].client_port
    async with aetcd.Client(host=host, port=port) as raw, registry(etcd, prefix) as one:
        with caplog.at_level(logging.WARNING, logger="lmfleet.controller"):
            await raw.put((prefix + "junk").encode(), b"not json")
            await one.register(A, status("m"))
            async with registry(etcd, prefix) as late:
                assert [w.address for w in late.all()] == [A]
        assert "not a worker record" in caplog.text


async def test_unreachable_etcd_keeps_the_view_and_refuses_writes(tmp_path: Path, prefix: str, caplog) -> None:
    clock = FakeClock()
    with EtcdCluster.local(tmp_path / "etcd") as own:
        async with registry(own, prefix, clock=clock) as one:
            await one.register(A, status("m"))
            with caplog.at_level(logging.INFO, logger="lmfleet.controller"):
                own.kill(own.members[0])
                await eventually(lambda: one.problem is not None)
                assert one.problem.startswith("etcd unreachable")
                assert [w.address for w in one.all()] == [A]  # the last view keeps answering
                for _ in range(3):
                    with pytest.raises(errors.ServiceUnavailable, match="etcd unreachable"):
                        await one.register(B, status("m"))
                    with pytest.raises(errors.ServiceUnavailable):
                        await one.heartbeat(A, status("m"))
                await asyncio.sleep(1.0)  # several probes fail meanwhile
                clock.now += 100
                own.start(own.members[0])
                await eventually(lambda: one.problem is None, timeout=30)
                await one.register(B, status("m"))
            assert [w.address for w in one.all()] == [A, B]
            # the fleet read afresh keeps what etcd did not change: A's last heartbeat is still the one seen before
            assert [w.last_heartbeat for w in one.all()] == [100.0, 200.0]
    outage = [r for r in caplog.records if "etcd unreachable" in r.getMessage()]
    assert len(outage) == 1 and outage[0].levelno == logging.WARNING  # once per outage, not per call
    assert sum("reachable again" in r.getMessage() for r in caplog.records) == 1


async def test_etcd_with_users_and_tls(tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    password = "etcd-pa55word-never-logged"
    with EtcdCluster.local(tmp_path / "auth") as secured:
        secured.etcdctl("user", "add", f"root:{password}")
        secured.etcdctl("auth", "enable")
        with caplog.at_level(logging.DEBUG):
            settings = EtcdSettings.from_url(secured.url, prefix=prefix, user="root", password=password)
            reg = EtcdRegistry(settings, 30)
            async with reg.running():
                assert reg.problem is None
                await reg.register(A, status("m"))
                assert [w.address for w in reg.all()] == [A]
            wrong = EtcdRegistry(EtcdSettings.from_url(secured.url, user="root", password="wrong-guess"), 30)
            async with wrong.running():
                assert wrong.problem is not None and "authentication failed" in wrong.problem
                with pytest.raises(errors.ServiceUnavailable):
                    await wrong.register(B, status("m"))
            anonymous = EtcdRegistry(EtcdSettings.from_url(secured.url, prefix=prefix), 30)
            async with anonymous.running():
                assert anonymous.problem is not None  # etcd refuses a client without a user
        assert password not in caplog.text and "wrong-guess" not in caplog.text

    certs = Certificates.make(tmp_path / "certs")
    with EtcdCluster.local(tmp_path / "tls", tls=certs) as tls:
        files = {"ca_file": str(certs.ca), "cert_file": str(certs.client_cert), "key_file": str(certs.client_key)}
        reg = EtcdRegistry(EtcdSettings.from_url(tls.url, prefix=prefix, **files), 30)
        async with reg.running():
            assert reg.problem is None and reg.settings.tls
            await reg.register(A, status("m"))
            assert [w.address for w in reg.all()] == [A]
        plain = EtcdRegistry(EtcdSettings.from_url(tls.url, prefix=prefix, connect_timeout_s=1), 30)
        async with plain.running():
            assert plain.problem is not None  # a plain-text client is refused


async def test_a_controller_that_never_read_the_fleet_does_not_answer_with_an_empty_one(prefix: str) -> None:
    dead = EtcdSettings.from_url(f"etcd://127.0.0.1:{free_port()}", prefix=prefix, connect_timeout_s=0.5)
    reg = EtcdRegistry(dead, 30)
    async with reg.running():
        assert reg.problem is not None and reg.problem.startswith("etcd unreachable")
        for read in (reg.all, reg.models, lambda: reg.workers_for("m")):
            with pytest.raises(RegistryUnavailable, match="not been read from etcd yet"):
                read()
        with pytest.raises(RegistryUnavailable):
            await reg.register(A, status("m"))


async def test_events_older_than_the_view_are_ignored() -> None:
    """Read-your-writes: a controller applies its own write at once; the watch may still deliver older events for
    that key, which must not undo it (nor may an old delete remove a newer registration)."""
    reg = EtcdRegistry(EtcdSettings.from_url("etcd://127.0.0.1"), 30, clock=FakeClock())
    reg._synced.set()  # as after the first read of the fleet
    prefix = reg.settings.prefix

    def kv(address: str, revision: int, value: bytes = b"") -> SimpleNamespace:
        return SimpleNamespace(key=(prefix + address).encode(), value=value, mod_revision=revision, create_revision=1)

    def put(address: str, revision: int, queue: int) -> SimpleNamespace:
        value = json.dumps({"status": status("m", queue_length=queue).model_dump(mode="json"), "lease": 7}).encode()
        return SimpleNamespace(kind=aetcd.EventKind.PUT, kv=kv(address, revision, value))

    async def events(*items: SimpleNamespace) -> AsyncIterator[SimpleNamespace]:
        for item in items:
            yield item

    reg._apply(A, status("m", queue_length=5), 7, revision=10)  # this controller's own write, revision 10
    await reg._consume(events(put(A, 9, queue=1), SimpleNamespace(kind=aetcd.EventKind.DELETE, kv=kv(A, 8))))
    assert [w.status.queue_length for w in reg.all()] == [5]
    await reg._consume(events(put(A, 11, queue=2), put(B, 12, queue=0)))
    assert [(w.address, w.status.queue_length) for w in reg.all()] == [(A, 2), (B, 0)]
    await reg._consume(events(SimpleNamespace(kind=aetcd.EventKind.DELETE, kv=kv(A, 13))))
    assert [w.address for w in reg.all()] == [B]
