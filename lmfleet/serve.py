"""`lmfleet serve`: the whole fleet on one machine, as one process tree.

Owns running a `ServePlan` (built from the flags by lmfleet.cli): starting the children (a controller, one worker
per model, the API server: the same `python -m lmfleet.<part>` commands a multi-host deployment runs), waiting
until the API lists every model, and stopping them all together (Ctrl-C / SIGTERM, or when any child dies). The
children share a registration secret the plan carries in their environment, so no other local process can
register a worker.

Does not own: flags and what the children are told (lmfleet.cli).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class Child:
    name: str
    argv: list[str]


@dataclass
class ServePlan:
    children: list[Child]  # controller first, API server last
    api_url: str
    models: set[str]  # the names the API must list before the fleet is ready (replicas share one)
    env: dict[str, str] = field(default_factory=dict, repr=False)  # added to the children's environment (secrets)
    api_key: str | None = field(default=None, repr=False)  # to ask the API for its models
    ready_timeout_s: float = 600.0


def wait_ready(plan: ServePlan, procs: Collection[subprocess.Popen], stopping: Callable[[], bool]) -> list[str] | None:
    """Wait until the API lists every model name of the plan; fail fast if a child dies. None: asked to stop."""
    deadline = time.monotonic() + plan.ready_timeout_s
    headers = {"Authorization": f"Bearer {plan.api_key}"} if plan.api_key else {}
    while time.monotonic() < deadline:
        if stopping():
            return None
        if any(p.poll() is not None for p in procs):
            raise SystemExit("lmfleet serve: a process exited during start-up (see its log above)")
        try:
            models = httpx.get(plan.api_url + "/v1/models", headers=headers, timeout=2).json().get("data", [])
            if plan.models <= {m["id"] for m in models}:
                return [m["id"] for m in models]
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit("lmfleet serve: timed out waiting for the workers")


def run(plan: ServePlan) -> int:
    env = {**os.environ, **plan.env}
    procs: list[subprocess.Popen] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for child in plan.children:
            procs.append(subprocess.Popen(child.argv, env=env))
        names = wait_ready(plan, procs, lambda: stopping)
        if names is None:
            return 0
        print(
            f"\nlmfleet is serving {', '.join(names)} at {plan.api_url}/v1 (web page: {plan.api_url}/ui)"
            "  (Ctrl-C stops everything)\n",
            flush=True,
        )
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return 0 if stopping else 1
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 15
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
