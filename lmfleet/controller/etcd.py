"""The fleet's registry in etcd: several controllers on one etcd cluster serve the same fleet (active-active).

Owns `EtcdSettings` (endpoints from `--registry etcd://HOST:PORT[,HOST:PORT…]`, key prefix, credentials, TLS) and
`EtcdRegistry`, the `FleetRegistry` backend over them:

  * One worker is one key, PREFIX + its address, holding its status and its lease id as JSON, and tied to a lease
    whose TTL is the heartbeat expiry (a FastChat worker's is longer: registry.expiry_of). Register grants a lease
    and puts the key; a heartbeat, on whichever controller receives it, keeps the lease alive and puts the load it
    reports; unregister deletes the key and revokes the lease. A worker that stops beating disappears when etcd
    expires its lease, on every controller at once.
  * Each controller's view: a range read of the prefix, then a watch from the next revision, so a controller that
    starts knows the whole fleet before it answers (`running()` waits up to `connect_timeout_s` for it) and every
    heartbeat's load reaches every controller as it is written. Its own writes apply to its view at once; an event
    older than what the view holds for that key is ignored.
  * Outages: while the watch is quiet, a linearizable read probes etcd every `probe_interval_s`. When etcd cannot
    be reached the view stays as last seen and reads keep answering from it; `problem` says why (the controller's
    `/ready` answers 503 with it) and the outage is logged once, as is the recovery. Writes then fail at once with
    RegistryUnavailable (503), so a worker's heartbeat loop registers again at its next beat: nothing is dropped
    silently. Once etcd answers again the view is read afresh. A controller that has never read the fleet answers
    reads with RegistryUnavailable too (503, not an empty fleet), so an API server keeps its cached view or asks
    another controller.

Several endpoints are one gRPC channel over all of them (pick_first: when the member in use dies, the next
connection goes to another; host names are resolved when the channel opens). The user and password authenticate
the channel and are never logged; TLS uses the CA, certificate and key files given. The client is aetcd's, with
the channel made here (aetcd opens only one plain host:port).

Does not own: HTTP, the registration secret, address validation (the controller app), dispatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aetcd
import grpc
from pydantic import BaseModel, ValidationError

from lmfleet.controller.registry import (
    Load,
    RegistryUnavailable,
    WorkerViews,
    apply_load,
    cancel,
    expiry_of,
    log_registered,
)
from lmfleet.protocol import fastchat
from lmfleet.protocol.worker import WorkerInfo, WorkerStatus

logger = logging.getLogger("lmfleet.controller")

DEFAULT_PREFIX = "/lmfleet/workers/"
DEFAULT_PORT = 2379
# gRPC's reconnect back-off grows to two minutes by default; etcd coming back must be noticed within a second.
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1000,
}


@dataclass
class EtcdSettings:
    """Where the registry lives. Validated on construction (ValueError)."""

    endpoints: list[tuple[str, int]]  # (host, port); several: members of one cluster
    prefix: str = DEFAULT_PREFIX
    user: str | None = None
    password: str | None = field(default=None, repr=False)  # never printed
    ca_file: str | None = None  # any of the three: TLS
    cert_file: str | None = None
    key_file: str | None = None
    timeout_s: float = 2.0  # one etcd call
    connect_timeout_s: float = 3.0  # how long a starting controller waits for the fleet before answering
    probe_interval_s: float = 1.0  # a quiet watch is checked this often

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("etcd: no endpoint given")
        if not self.prefix:
            raise ValueError("etcd: the key prefix must not be empty")
        if (self.user is None) != (self.password is None):
            raise ValueError("etcd: give both a user and a password, or neither")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("etcd: a client certificate needs its key (and the key its certificate)")
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"etcd: {path} is not a file")
        if not (self.timeout_s > 0 and self.connect_timeout_s > 0 and self.probe_interval_s > 0):
            raise ValueError("etcd: timeouts and the probe interval must be > 0")

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> EtcdSettings:
        """`etcd://HOST[:PORT][,HOST[:PORT]…]` (port 2379 by default; IPv6 in brackets). Credentials go in their
        own settings, never in the URL (it shows in `ps` and in logs)."""
        scheme, sep, rest = url.partition("://")
        if scheme.lower() != "etcd" or not sep:
            raise ValueError(f"registry {url!r}: expected etcd://HOST:PORT[,HOST:PORT...]")
        endpoints = []
        for item in rest.rstrip("/").split(","):
            try:
                parts = urlsplit("//" + item.strip())
                port = parts.port or DEFAULT_PORT
            except ValueError as exc:
                raise ValueError(f"registry {url!r}: {item!r}: {exc}") from None
            if not parts.hostname or parts.path or parts.query or parts.fragment:
                raise ValueError(f"registry {url!r}: {item!r} is not HOST[:PORT]")
            if parts.username is not None or parts.password is not None:
                raise ValueError("registry: put etcd credentials in --etcd-user / --etcd-password, not in the URL")
            endpoints.append((parts.hostname, port))
        return cls(endpoints=endpoints, **kwargs)

    @property
    def tls(self) -> bool:
        return any(p is not None for p in (self.ca_file, self.cert_file, self.key_file))

    def __str__(self) -> str:
        hosts = ",".join(_hostport(h, p) for h, p in self.endpoints)
        return f"etcd://{hosts} prefix={self.prefix} tls={'on' if self.tls else 'off'} user={self.user or 'none'}"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def channel_target(endpoints: list[tuple[str, int]]) -> str:
    """The gRPC target for the endpoints: `host:port` for one; for several, `ipv4:` (or `ipv6:`) and every address,
    host names resolved now (gRPC's DNS resolver takes one name only)."""
    if len(endpoints) == 1:
        return _hostport(*endpoints[0])
    loop = asyncio.get_running_loop()
    addresses: list[tuple[str, int]] = []
    for host, port in endpoints:
        try:
            addresses.append((str(ipaddress.ip_address(host)), port))
        except ValueError:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addresses.append((str(infos[0][4][0]), port))
    families = {ipaddress.ip_address(h).version for h, _ in addresses}
    if len(families) > 1:
        raise ValueError("etcd: several endpoints must all be IPv4 or all IPv6")
    return f"ipv{families.pop()}:" + ",".join(_hostport(h, p) for h, p in addresses)


class _Client(aetcd.Client):
    """aetcd's client over a channel to every endpoint, with TLS when configured."""

    def __init__(self, settings: EtcdSettings) -> None:
        super().__init__(
            username=settings.user,
            password=settings.password,
            timeout=settings.timeout_s,  # aetcd hints int; gRPC takes seconds as float
            options=_CHANNEL_OPTIONS,
        )
        self._settings = settings

    def _credentials(self) -> grpc.ChannelCredentials | None:
        s = self._settings
        if not s.tls:
            return None

        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(s.ca_file), read(s.key_file), read(s.cert_file))

    async def connect(self) -> None:  # aetcd's connect, with our channel
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]  # another task is connecting
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            target = await channel_target(self._settings.endpoints)
            options = list(self._options.items())
            credentials = self._credentials()
            self.channel = (
                grpc.aio.secure_channel(target, credentials, options=options)
                if credentials is not None
                else grpc.aio.insecure_channel(target, options=options)
            )
            if self._username is not None:
                self.auth_stub = aetcd.rpc.AuthStub(self.channel)
                request = aetcd.rpc.AuthenticateRequest(name=self._username, password=self._password)
                try:
                    resp = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                except grpc.aio.AioRpcError as exc:
                    await self.channel.close()
                    self._init_channel_attrs()
                    raise aetcd.ClientError(f"authentication failed: {exc.code().name}: {exc.details()}") from None
                self.metadata = (("token", resp.token),)
            self.kvstub = aetcd.rpc.KVStub(self.channel)
            self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
            self.leasestub = aetcd.rpc.LeaseStub(self.channel)
            self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(
                aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


class _Record(BaseModel):
    """A worker's value in etcd."""

    status: WorkerStatus
    lease: int


@dataclass
class _Entry:
    info: WorkerInfo
    lease: int
    revision: int  # etcd revision this entry reflects


class EtcdRegistry(WorkerViews):
    """The `FleetRegistry` in etcd; see the module docstring. `clock` stamps `last_heartbeat` (this controller's
    clock: the time it learnt of the heartbeat)."""

    def __init__(
        self,
        settings: EtcdSettings,
        expiry_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        fastchat_expiry_s: float = fastchat.HEARTBEAT_EXPIRY_S,
    ) -> None:
        if not expiry_s > 0:
            raise ValueError(f"expiry_s must be > 0, got {expiry_s!r}")
        self.settings = settings
        self.expiry_s = float(expiry_s)
        self.fastchat_expiry_s = float(fastchat_expiry_s)
        self._clock = clock
        self._prefix = settings.prefix.encode()
        self._entries: dict[str, _Entry] = {}
        self._client: _Client | None = None
        self._problem: str | None = "not connected to etcd yet"
        self._down = False  # an outage is logged once, and so is its end
        self._synced = asyncio.Event()
        self._started = 0.0  # when running() began (the fleet-loaded log line says how long it took)
        # This controller's own writes (its metrics): registered, re-registered, unregistered. Expiry is etcd's.
        self.events: Counter[str] = Counter()

    @property
    def problem(self) -> str | None:
        return self._problem

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Connect, load the fleet (waiting up to `connect_timeout_s` for it), then follow etcd until closed."""
        self._client = _Client(self.settings)
        self._started = time.monotonic()
        follower = asyncio.create_task(self._follow(), name="lmfleet-etcd-watch")
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._synced.wait(), self.settings.connect_timeout_s)
            yield
        finally:
            await cancel(follower)
            with contextlib.suppress(Exception):
                await self._client.close()

    # -- following etcd ----------------------------------------------------------------------------------------

    async def _follow(self) -> None:
        client = self._require_client()
        while True:
            try:
                await client.connect()
                snapshot = await client.get_prefix(self._prefix)
                self._load(snapshot)
                watch = await client.watch_prefix(self._prefix, start_revision=snapshot.header.revision + 1)
                reader = asyncio.create_task(self._consume(watch), name="lmfleet-etcd-events")
                try:
                    while True:
                        self._recovered()
                        done, _ = await asyncio.wait({reader}, timeout=self.settings.probe_interval_s)
                        if done:
                            reader.result()
                            raise ConnectionError("the watch ended")
                        await client.get(self._prefix)  # linearizable: fails without a quorum
                finally:
                    await cancel(reader)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(exc)
                with contextlib.suppress(Exception):
                    await client.close()  # a fresh channel (and auth token) next time
                await asyncio.sleep(self.settings.probe_interval_s / 2)

    async def _consume(self, watch: Any) -> None:
        async for event in watch:
            address = event.kv.key[len(self._prefix) :].decode(errors="replace")
            if event.kind == aetcd.EventKind.DELETE:
                entry = self._entries.get(address)
                if entry is not None and event.kv.mod_revision >= entry.revision:
                    del self._entries[address]
                    logger.info("worker %s left the fleet (unregistered or its lease expired)", address)
            else:
                self._put_kv(address, event.kv)

    def _load(self, snapshot: Any) -> None:
        """Replace the view with a full read (registration order). An entry etcd has not changed since is kept as
        it was, with the time this controller learnt of it."""
        old, self._entries = self._entries, {}
        for kv in sorted(snapshot, key=lambda kv: kv.create_revision):
            address = kv.key[len(self._prefix) :].decode(errors="replace")
            kept = old.get(address)
            if kept is not None and kept.revision == kv.mod_revision:
                self._entries[address] = kept
            else:
                self._put_kv(address, kv)

    def _put_kv(self, address: str, kv: Any) -> None:
        try:
            record = _Record.model_validate_json(kv.value)
        except ValidationError:
            logger.warning("ignoring etcd key %r: not a worker record", kv.key.decode(errors="replace"))
            return
        self._apply(address, record.status, record.lease, kv.mod_revision)

    def _apply(self, address: str, status: WorkerStatus, lease: int, revision: int) -> WorkerInfo:
        entry = self._entries.get(address)
        if entry is not None and revision < entry.revision:
            return entry.info
        info = WorkerInfo(address=address, status=status, last_heartbeat=self._clock())
        self._entries[address] = _Entry(info, lease, revision)
        return info

    def _failed(self, exc: BaseException) -> None:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        reason = f"etcd unreachable ({type(exc).__name__}{': ' + detail if detail else ''})"
        if not self._down:
            self._down = True
            logger.warning(
                "%s at %s: serving the last known view of %d worker(s); registrations wait until it is back",
                reason,
                self.settings,
                len(self._entries),
            )
        self._problem = reason

    def _recovered(self) -> None:
        if not self._synced.is_set():
            took = time.monotonic() - self._started
            logger.info("fleet loaded from %s in %.3fs: %d worker(s)", self.settings, took, len(self._entries))
            self._synced.set()
        if self._down:
            self._down = False
            logger.info("etcd reachable again: %d worker(s) in the fleet", len(self._entries))
        self._problem = None

    # -- writes ------------------------------------------------------------------------------------------------

    def _require_client(self) -> _Client:
        if self._client is None:
            raise RuntimeError("EtcdRegistry used outside running()")
        return self._client

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[_Client]:
        """The client for one write; RegistryUnavailable (the worker retries) while etcd is unreachable."""
        client = self._require_client()
        if self._problem is not None:
            raise RegistryUnavailable(f"the fleet registry cannot record this now: {self._problem}")
        try:
            yield client
        except aetcd.ClientError as exc:
            self._failed(exc)
            raise RegistryUnavailable(f"the fleet registry cannot record this now: {self._problem}") from None

    def ttl(self, status: WorkerStatus) -> int:
        """The lease TTL of a worker reporting `status`, in whole seconds as etcd counts them."""
        return max(1, math.ceil(expiry_of(status, self.expiry_s, self.fastchat_expiry_s)))

    def _key(self, address: str) -> bytes:
        return self._prefix + address.encode()

    async def register(self, address: str, status: WorkerStatus) -> WorkerInfo:
        old = self._entries.get(address)
        async with self._writing() as client:
            lease = await client.lease(self.ttl(status))
            put = await client.put(self._key(address), _value(status, lease.id), lease=lease.id)
            if old is not None and old.lease != lease.id:  # the key moved to the new lease: the old one holds nothing
                with contextlib.suppress(aetcd.ClientError):
                    await client.revoke_lease(old.lease)
        known = old is not None
        self.events["re-registered" if known else "registered"] += 1
        log_registered(address, status, known)
        return self._apply(address, status, lease.id, put.header.revision)

    async def heartbeat(self, address: str, status: Load = None) -> bool:
        entry = self._entries.get(address)
        if entry is None:
            return False
        new_status = apply_load(entry.info.status, status)
        async with self._writing() as client:
            try:
                alive = await client.refresh_lease(entry.lease)
                if alive is None or alive.TTL <= 0:
                    return False  # expired: etcd deletes the key, the watch removes the entry
                put = await client.put(self._key(address), _value(new_status, entry.lease), lease=entry.lease)
            except aetcd.ClientError as exc:
                if "lease not found" in str(exc):  # revoked or expired between the two calls
                    return False
                raise
        self._apply(address, new_status, entry.lease, put.header.revision)
        return True

    async def unregister(self, address: str) -> bool:
        entry = self._entries.get(address)
        async with self._writing() as client:
            deleted = await client.delete(self._key(address))
            if entry is not None:
                with contextlib.suppress(aetcd.ClientError):  # already gone: nothing to revoke
                    await client.revoke_lease(entry.lease)
        if deleted is not None:
            self._entries.pop(address, None)
            self.events["unregistered"] += 1
            logger.info("unregistered worker %s", address)
        return deleted is not None

    async def expire(self) -> list[str]:
        """Nothing to do: etcd expires workers (their leases), and the watch removes them."""
        return []

    def _live(self) -> list[WorkerInfo]:
        if not self._synced.is_set():  # an empty list would read as "no workers" to the API servers
            raise RegistryUnavailable(f"the fleet has not been read from etcd yet: {self._problem}")
        return [entry.info for entry in self._entries.values()]


def _value(status: WorkerStatus, lease: int) -> bytes:
    return json.dumps({"status": status.model_dump(mode="json"), "lease": lease}).encode()
