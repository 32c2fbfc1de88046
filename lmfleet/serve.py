"""`lmfleet serve`: the whole fleet on one machine, as one process tree.

Owns: starting a controller, one worker per `--model-path` and the API server as child processes (the same
`python -m lmfleet.<part>` commands a multi-host deployment runs), waiting until the API answers, and
stopping them all together (Ctrl-C / SIGTERM, or when any child dies). The children share a registration
secret generated here and passed through the environment, so no other local process can register a worker.
`--demo` builds a tiny random model (its output is noise) so the stack can be tried with no model at hand.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from lmfleet import cli

DEMO_MODEL_NAME = "lmfleet-demo"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address the API server binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="API server port")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--model-path", action="append", default=[], help="a model to serve; repeat for several")
    p.add_argument("--model-names", action="append", default=None,
                   help="names for the matching --model-path (comma-separated); repeat in the same order")
    p.add_argument("--demo", action="store_true",
                   help=f"also serve a tiny random model as '{DEMO_MODEL_NAME}' (no download; output is noise)")
    p.add_argument("--demo-dir", default=str(Path.home() / ".cache" / "lmfleet" / "demo-model"),
                   help="where --demo builds its model")
    p.add_argument("--controller-port", type=int, default=21001)
    p.add_argument("--worker-port", type=int, default=21002, help="first worker's port; the next ones count up")
    p.add_argument("--dispatch-method", default="shortest_queue")
    cli.add_worker_args(p, serve=True)
    cli.add_api_args(p, serve=True)


def _demo_model(path: Path) -> Path:
    if not (path / "config.json").exists():
        from lmfleet.testmodel import make_test_model

        print(f"building the demo model in {path} ...", flush=True)
        make_test_model(path, size="tiny")
    return path


def _worker_flags(args: argparse.Namespace) -> list[str]:
    flags = {
        "--device": args.device,
        "--dtype": args.dtype,
        "--max-num-seqs": args.max_num_seqs,
        "--max-batch-tokens": args.max_batch_tokens,
        "--limit-worker-concurrency": args.limit_worker_concurrency,
        "--max-model-len": args.max_model_len,
        "--heartbeat-interval": args.heartbeat_interval,
    }
    return [s for k, v in flags.items() if v is not None for s in (k, str(v))]


def plan(args: argparse.Namespace) -> list[list[str]]:
    """The command lines of every child, controller first."""
    models = [(m, None) for m in args.model_path]
    for i, names in enumerate(args.model_names or []):
        if i < len(models):
            models[i] = (models[i][0], names)
    if args.demo:
        models.append((str(_demo_model(Path(args.demo_dir))), DEMO_MODEL_NAME))
    if not models:
        raise SystemExit("lmfleet serve: give --model-path PATH (repeatable) or --demo")
    py = [sys.executable, "-m"]
    controller = f"http://127.0.0.1:{args.controller_port}"
    log = ["--log-level", args.log_level]
    cmds = [py + ["lmfleet.controller", "--port", str(args.controller_port), "--dispatch-method",
                  args.dispatch_method] + log]
    for i, (path, names) in enumerate(models):
        cmd = py + ["lmfleet.worker", "--port", str(args.worker_port + i), "--model-path", path,
                    "--controller-address", controller] + _worker_flags(args) + log
        cmds.append(cmd + (["--model-names", names] if names else []))
    api = py + ["lmfleet.api", "--host", args.host, "--port", str(args.port), "--controller-address", controller]
    if args.default_model:
        api += ["--default-model", args.default_model]
    if args.allowed_origins:
        api += ["--allowed-origins", ",".join(args.allowed_origins)]
    for name in cli.API_PASSTHROUGH:
        api += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    cmds.append(api + log)
    return cmds


def served_names(cmds: list[list[str]]) -> set[str]:
    """The model names the workers in `cmds` (from `plan`) will register: `--model-names`, else `--model-path`.
    Two workers may serve the same name (replicas), so the API lists each name once."""
    names: set[str] = set()
    for cmd in cmds:
        if "--model-names" in cmd:
            names.update(cli._csv(cmd[cmd.index("--model-names") + 1]))
        elif "--model-path" in cmd:
            names.add(cmd[cmd.index("--model-path") + 1])
    return names


def _wait_ready(
    api_url: str,
    procs: list[subprocess.Popen],
    key: str | None,
    stopping: Callable[[], bool],
    expected: set[str],
    timeout_s: float = 600,
) -> list[str] | None:
    """Wait until the API lists every model name in `expected`; fail fast if a child dies. None: asked to stop."""
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    while time.monotonic() < deadline:
        if stopping():
            return None
        if any(p.poll() is not None for p in procs):
            raise SystemExit("lmfleet serve: a process exited during start-up (see its log above)")
        try:
            models = httpx.get(api_url + "/v1/models", headers=headers, timeout=2).json().get("data", [])
            if expected <= {m["id"] for m in models}:
                return [m["id"] for m in models]
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit("lmfleet serve: timed out waiting for the workers")


def run(args: argparse.Namespace) -> int:
    cmds = plan(args)
    env = dict(os.environ)
    env.setdefault("LMFLEET_REGISTRATION_SECRET", secrets.token_urlsafe(24))
    keys = cli._api_keys(args)
    if keys:
        env["LMFLEET_API_KEYS"] = ",".join(keys)  # through the environment, not argv: keys stay out of `ps`
    procs: list[subprocess.Popen] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for cmd in cmds:
            procs.append(subprocess.Popen(cmd, env=env))
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        api_url = f"http://{host}:{args.port}"
        names = _wait_ready(api_url, procs, keys[0] if keys else None, lambda: stopping, served_names(cmds))
        if names is None:
            return 0
        print(f"\nlmfleet is serving {', '.join(names)} at {api_url}/v1  (Ctrl-C stops everything)\n", flush=True)
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
