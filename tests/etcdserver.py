"""etcd servers for tests: Debian's `etcd` (etcd-server 3.4) started in a temporary data directory, one member or a
cluster, on loopback ports or on addresses inside network namespaces (`tests/netns.py`). Whoever starts a member
stops it (`EtcdCluster` is a context manager that always kills its members)."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.conftest import Proc, free_port, wait_until
from tests.programs import program


def require_etcd() -> str:
    """The etcd server binary (tests.programs: skipped where missing, a failure in CI)."""
    return program("etcd")


@dataclass
class Certificates:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate it signed (openssl)."""

    root: Path

    ca = property(lambda self: self.root / "ca.pem")
    server_cert = property(lambda self: self.root / "server.pem")
    server_key = property(lambda self: self.root / "server.key")
    client_cert = property(lambda self: self.root / "client.pem")
    client_key = property(lambda self: self.root / "client.key")

    @classmethod
    def make(cls, root: Path) -> Certificates:
        openssl = program("openssl")
        root.mkdir(parents=True, exist_ok=True)

        def run(*args: str) -> None:
            subprocess.run([openssl, *args], check=True, capture_output=True, cwd=root, timeout=60)

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=lmfleet test CA")  # fmt: skip
        for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
            (root / f"{name}.ext").write_text(ext + "\n")
            run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=lmfleet {name}")  # fmt: skip
            run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")  # fmt: skip
        return cls(root)


@dataclass
class Member:
    name: str
    host: str  # where it listens (loopback, or its namespace's address)
    client_port: int
    peer_port: int
    proc: Proc | None = None
    scheme: str = "http"  # https: the cluster's `tls`

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

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
    tls: Certificates | None = None  # clients must use TLS and present a certificate signed by its CA

    @classmethod
    def local(cls, root: Path, n: int = 1, *, tls: Certificates | None = None) -> EtcdCluster:
        scheme = "https" if tls else "http"
        return cls(
            root, [Member(f"m{i}", "127.0.0.1", free_port(), free_port(), scheme=scheme) for i in range(n)], tls=tls
        )

    def etcdctl(self, *args: str) -> str:
        """Run etcdctl against the first member (plain HTTP only)."""
        cmd = [program("etcdctl"), "--endpoints", self.members[0].client_url, *args]
        return subprocess.run(
            cmd, check=True, capture_output=True, text=True, timeout=30, env={**os.environ, **self.env}
        ).stdout

    @property
    def url(self) -> str:
        """What `lmfleet controller --registry` takes."""
        return "etcd://" + ",".join(m.endpoint for m in self.members)

    def cmd(self, m: Member, state: str) -> list[str]:
        cluster = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [
            *self.prefix.get(m.name, []),
            program("etcd"),
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
            "--auto-compaction-mode", "revision", "--auto-compaction-retention", "1000",
            *(
                ["--cert-file", str(self.tls.server_cert), "--key-file", str(self.tls.server_key),
                 "--trusted-ca-file", str(self.tls.ca), "--client-cert-auth"]
                if self.tls else []
            ),
        ]  # fmt: skip

    def start(self, m: Member) -> None:
        """Start (or restart, on the same data) one member."""
        state = "existing" if (self.root / m.name).exists() else "new"
        m.proc = Proc(f"etcd-{m.name}", self.cmd(m, state), self.root / f"etcd-{m.name}.log", self.env).start()

    def healthy(self, m: Member, timeout: float = 30) -> None:
        verify: ssl.SSLContext | bool = True
        if self.tls is not None:
            verify = ssl.create_default_context(cafile=str(self.tls.ca))
            verify.load_cert_chain(self.tls.client_cert, self.tls.client_key)

        def ok() -> bool:
            r = httpx.get(m.client_url + "/health", timeout=2, trust_env=False, verify=verify)
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
