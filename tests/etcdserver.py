"""etcd servers for tests: Debian's `etcd` (etcd-server 3.4) started in a temporary data directory, one member or a
cluster, on loopback ports or on addresses inside network namespaces (`tests/netns.py`). Whoever starts a member
stops it (`EtcdCluster` is a context manager that always kills its members)."""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import Proc, free_port, wait_until

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def require_etcd() -> None:
    """Skip without an etcd server binary; in CI it is a broken install step (`make test` installs etcd-server)."""
    if not os.access(ETCD, os.X_OK):
        if os.environ.get("CI"):
            raise RuntimeError("etcd is not installed: `make test` installs the apt package etcd-server")
        pytest.skip("etcd is not installed (apt package etcd-server)")


@dataclass
class Member:
    name: str
    host: str  # where it listens (loopback, or its namespace's address)
    client_port: int
    peer_port: int
    proc: Proc | None = None

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"


@dataclass
class EtcdCluster:
    """One or more members of one cluster. `prefix` wraps each command (e.g. `ip netns exec NS`)."""

    root: Path
    members: list[Member]
    prefix: dict[str, list[str]] = field(default_factory=dict)  # member name -> command prefix
    env: dict[str, str] = field(default_factory=lambda: {"ETCD_UNSUPPORTED_ARCH": "", "GOMAXPROCS": "1"})

    @classmethod
    def local(cls, root: Path, n: int = 1) -> EtcdCluster:
        return cls(root, [Member(f"m{i}", "127.0.0.1", free_port(), free_port()) for i in range(n)])

    @property
    def url(self) -> str:
        """What `lmfleet controller --registry` takes."""
        return "etcd://" + ",".join(m.endpoint for m in self.members)

    def cmd(self, m: Member, state: str) -> list[str]:
        cluster = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [
            *self.prefix.get(m.name, []),
            ETCD,
            "--name", m.name,
            "--data-dir", str(self.root / m.name),
            "--listen-client-urls", m.client_url,
            "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", "lmfleet-test",
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
        ]  # fmt: skip

    def start(self, m: Member) -> None:
        """Start (or restart, on the same data) one member."""
        state = "existing" if (self.root / m.name).exists() else "new"
        m.proc = Proc(f"etcd-{m.name}", self.cmd(m, state), self.root / f"etcd-{m.name}.log", self.env).start()

    def healthy(self, m: Member, timeout: float = 30) -> None:
        def ok() -> bool:
            r = httpx.get(m.client_url + "/health", timeout=2, trust_env=False)
            return r.status_code == 200 and r.json().get("health") == "true"

        wait_until(ok, timeout=timeout, procs=[m.proc] if m.proc else [], what=f"etcd {m.name} healthy")

    def kill(self, m: Member) -> None:
        if m.proc is not None:
            m.proc.signal(signal.SIGKILL)
            if m.proc.popen is not None:
                m.proc.popen.wait(10)

    def __enter__(self) -> EtcdCluster:
        require_etcd()
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            for m in self.members:
                self.start(m)
            for m in self.members:
                self.healthy(m)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        for m in self.members:
            self.kill(m)

    def logs(self) -> str:
        return "\n".join(m.proc.tail() for m in self.members if m.proc)
