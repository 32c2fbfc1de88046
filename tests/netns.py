"""Hosts for tests: Linux network namespaces on one bridge, so each part of the fleet has its own network host.

`Network` creates a bridge in the root namespace (address .254, so the test process reaches every host through
it) and, per host, a namespace with a veth pair whose inside end is that host's `eth0`, addressed from
`SUBNET` (10.213.0.0/24, used only by these namespaces and that bridge). `cut(host)` / `mend(host)` take the host's
link down and up. Everything is deleted by `close()` (a context manager: even when a test fails), and a run that
starts deletes what a crashed earlier run left (names carry the creating process's id). Needs root and
`ip netns` (iproute2): `require_netns()` skips with the reason otherwise.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field

import pytest

from tests.programs import program

SUBNET = "10.213.0"
PREFIX = "lmft"  # every namespace and interface these tests create starts with it


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def require_netns() -> None:
    """Skip unless this process can create network namespaces (root and iproute2's `ip netns`)."""
    program("ip")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    probe = f"{PREFIX}-probe-{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        pytest.skip(f"`ip netns add` failed here: {made.stderr.strip()}")
    ip("netns", "del", probe, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> None:
    """Delete namespaces and links an earlier run left behind when it was killed (its process is gone)."""
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(rf"{PREFIX}(\d+)-\w+", name)
        if m and not _alive(int(m.group(1))):
            ip("netns", "del", name, check=False)
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(rf"\d+: ({PREFIX}[bv](\d+)x?\w*)[@:]", line)
        if m and not _alive(int(m.group(2))):
            ip("link", "del", m.group(1), check=False)


@dataclass
class Host:
    name: str
    ns: str
    address: str
    veth: str  # the root-namespace end, on the bridge

    def run(self, *cmd: str) -> list[str]:
        """A command line that runs `cmd` on this host."""
        return ["ip", "netns", "exec", self.ns, *cmd]


@dataclass
class Network:
    hosts: dict[str, Host] = field(default_factory=dict)
    pid: int = field(default_factory=os.getpid)

    @property
    def bridge(self) -> str:
        return f"{PREFIX}b{self.pid}"

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge (the test process's own address on this network)."""
        return f"{SUBNET}.254"

    def __enter__(self) -> Network:
        require_netns()
        remove_leftovers()
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def add(self, name: str, octet: int) -> Host:
        n = len(self.hosts)
        host = Host(name, f"{PREFIX}{self.pid}-{name}", f"{SUBNET}.{octet}", f"{PREFIX}v{self.pid}x{n}")
        self.hosts[name] = host
        inside = f"{PREFIX}i{self.pid}x{n}"
        ip("netns", "add", host.ns)
        ip("link", "add", host.veth, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", host.ns)
        for args in (
            ("link", "set", inside, "name", "eth0"),
            ("addr", "add", f"{host.address}/24", "dev", "eth0"),
            ("link", "set", "eth0", "up"),
            ("link", "set", "lo", "up"),
        ):
            ip("-n", host.ns, *args)
        ip("link", "set", host.veth, "master", self.bridge, "up")
        return host

    def cut(self, name: str) -> None:
        """Take the host's link down: its packets go nowhere, its processes run on."""
        ip("link", "set", self.hosts[name].veth, "down")

    def mend(self, name: str) -> None:
        ip("link", "set", self.hosts[name].veth, "up")

    def close(self) -> None:
        """Delete every namespace (with its end of the veth pair, which takes the other end along) and the bridge.
        The processes started in them must be stopped first."""
        for host in self.hosts.values():
            ip("netns", "del", host.ns, check=False)
            ip("link", "del", host.veth, check=False)
        self.hosts.clear()
        ip("link", "del", self.bridge, check=False)
