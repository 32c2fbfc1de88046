"""The README's multi-model figures: a cold request (the model loads first) against a warm one, and the memory of
the worker's processes before and after an unload.

    PYTHONPATH=. python scripts/bench_multimodel.py [--threads 1]

Starts `lmfleet worker --models-config` (no controller) with SmolLM2 and Qwen2.5-Coder 0.5B (llama.cpp) and MiniLM
(embeddings), then for each model: the time to the first streamed chunk (an embedding: to the answer) cold and warm,
the resident memory of the worker and of the model's process when loaded, and after `POST /worker/models/unload`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmfleet import models  # noqa: E402
from scripts.real_models import ensure  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def first_answer_s(url: str, model: str) -> float:
    started = time.monotonic()
    if model == "minilm":
        body = {"request_id": "b", "model": model, "input": ["A cat sat on the mat."]}
        httpx.post(url + "/worker/embed", json=body, timeout=300).raise_for_status()
        return time.monotonic() - started
    body = {"request_id": "b", "model": model, "prompt": "Hello, my name is", "max_tokens": 8, "temperature": 0}
    with httpx.stream("POST", url + "/worker/generate", json=body, timeout=300) as r:
        r.raise_for_status()
        elapsed = None
        for _ in r.iter_lines():
            elapsed = elapsed or time.monotonic() - started
    assert elapsed is not None
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    paths = {
        "smollm2": models.packaged("smollm2-135m-instruct"),
        "qwen05": ensure("qwen2.5-coder-0.5b"),
        "minilm": models.packaged("all-minilm-l6-v2"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "models.ini"
        config.write_text(
            f"[*]\nthreads = {args.threads}\nmax-model-len = 2048\n\n"
            + "".join(f"[{name}]\npath = {path}\n\n" for name, path in paths.items())
        )
        port = 23000 + os.getpid() % 1000
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "lmfleet.worker", "--models-config", str(config), "--no-register"]
        proc = subprocess.Popen(
            [*cmd, "--port", str(port), "--max-loaded-models", "3", "--log-level", "warning"],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        try:
            for _ in range(300):
                try:
                    if httpx.get(url + "/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            print(f"worker process alone: {rss_mib(proc.pid):.0f} MiB")
            print("| model | cold first answer | warm first answer | model process loaded | after unload |")
            print("|---|---|---|---|---|")
            for name in paths:
                cold = first_answer_s(url, name)
                warm = min(first_answer_s(url, name) for _ in range(3))
                state = next(m for m in httpx.get(url + "/worker/status").json()["models"] if m["name"] == name)
                loaded = state["memory_bytes"] / (1 << 20)
                gone = httpx.post(url + "/worker/models/unload", json={"model": name}, timeout=60).json()
                print(
                    f"| {name} | {cold:.2f} s | {warm * 1000:.0f} ms | {loaded:.0f} MiB | "
                    f"{gone['memory_bytes'] / (1 << 20):.0f} MiB (worker {rss_mib(proc.pid):.0f} MiB) |"
                )
        finally:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
