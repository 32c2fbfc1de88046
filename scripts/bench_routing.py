"""Cached prompt tokens under two dispatch policies, on the same multi-turn workload and the same fleet shape.

For each policy: a controller, `--replicas` llama.cpp workers of one GGUF and `--api-servers` API servers dispatching
with it, all fresh; then `--conversations` conversations of `--turns` turns each, `--concurrency` at a time, every
one opening with the same system prompt, each turn a new question on top of the conversation so far (greedy, the
model's own answers kept in the history, `--max-tokens` each with ignore_eos, so every request decodes as much). With
several API servers a conversation's turns go to them in turn (the hard case: a server learns where the previous
turn went only from the workers' heartbeats).

Reported per policy: prompt tokens (the answers' usage), prompt tokens the workers computed (their
lmfleet_worker_prefill_tokens_total; a prefix-cache hit is not computed), cached = the difference, the cached tokens the
answers reported (`usage.prompt_tokens_details.cached_tokens`, where the server reports it), each replica's share of the
requests (its decode counter's share: every request decodes `--max-tokens`), and `follow`: the share of later turns
served by the replica that served the conversation's previous turn (read from the prompt prefixes the replicas report,
lmfleet.api.affinity), which says how well the routing did whatever the engine's cache makes of it. Then cached_ratio,
the second policy's cached tokens over the first's: the issue asks >= 1.5 with no replica above 60 %.

    python scripts/bench_routing.py --model-path SmolLM2.gguf                  # a quick run (under a minute)
    python scripts/bench_routing.py --model-path Q.gguf --conversations 32 --turns 6 --concurrency 8 \\
        --system-words 600 --api-servers 2 --threads 4 --json out.json         # the real one

Not a test: timings and cache hits depend on the machine and on the engine's prefix cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from lmfleet.api.affinity import for_worker, prefix_key
from lmfleet.protocol.worker import ChatMessageIn, GenerateRequest

TOPICS = ["France", "Japan", "the sea", "volcanoes", "bees", "chess", "the moon", "rivers", "bread", "trains"]
QUESTIONS = [
    "Tell me one fact about {t}.",
    "Why does that matter?",
    "Give another example about {t}.",
    "Summarize what we said about {t}.",
    "What is a common mistake about {t}?",
    "Ask me a question about {t}.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(check: Any, what: str, procs: list[subprocess.Popen[bytes]], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"a process exited while waiting for {what}")
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            if check():
                return
        time.sleep(0.3)
    raise SystemExit(f"timed out waiting for {what}")


@contextlib.contextmanager
def fleet(args: argparse.Namespace, policy: str, logs: Path) -> Iterator[tuple[list[str], list[int]]]:
    """The API servers' URLs and the workers' ports of a fresh fleet dispatching with `policy`."""
    py = [sys.executable, "-m"]
    cport = free_port()
    controller = f"http://127.0.0.1:{cport}"
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, cmd: list[str]) -> None:
        out = open(logs / f"{policy}-{name}.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start("controller", py + ["lmfleet.controller", "--port", str(cport), "--heartbeat-expiration", "3"])
        ports = [free_port() for _ in range(args.replicas)]
        for i, port in enumerate(ports):
            worker = ["lmfleet.worker", "--port", str(port), "--model-path", args.model_path, "--model-names", "m"]
            worker += [
                "--controller-address",
                controller,
                "--heartbeat-interval",
                "0.5",
                "--threads",
                str(args.threads),
            ]
            start(f"worker-{i}", py + worker + ["--max-model-len", str(args.max_model_len)])
        apis = [free_port() for _ in range(args.api_servers)]
        for i, port in enumerate(apis):
            api = ["lmfleet.api", "--port", str(port), "--controller-address", controller, "--dispatch-method", policy]
            start(f"api-{i}", py + api)
        urls = [f"http://127.0.0.1:{p}" for p in apis]
        for url in urls:
            wait(lambda u=url: len(httpx.get(u + "/v1/models").json()["data"]) == 1, "the model", procs)
        wait(lambda: len(httpx.get(controller + "/workers").json()["workers"]) == args.replicas, "every worker", procs)
        yield urls, ports
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def counters(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    wanted = {"lmfleet_worker_prefill_tokens_total", "lmfleet_worker_decode_tokens_total"}
    out = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted:
                out[s.name] += s.value
    return out


def run(args: argparse.Namespace, policy: str, logs: Path) -> dict[str, Any]:
    system = " ".join(
        ["You are a patient teacher who answers briefly and precisely."] * max(args.system_words // 10, 1)
    )
    with fleet(args, policy, logs) as (urls, ports):
        clients = [openai.OpenAI(base_url=u + "/v1", api_key="none", max_retries=0, timeout=600) for u in urls]
        before = [counters(p) for p in ports]
        totals = {"requests": 0, "prompt_tokens": 0, "reported_cached": 0}
        turns: list[list[list[int]]] = []  # per conversation, per turn: the hashes its replica reports

        def converse(i: int) -> None:
            topic = TOPICS[i % len(TOPICS)] + ("" if i < len(TOPICS) else f" (part {i // len(TOPICS)})")
            history: list[dict[str, str]] = [{"role": "system", "content": system}]
            hashes: list[list[int]] = []
            turns.append(hashes)
            for turn in range(args.turns):
                history.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)].format(t=topic)})
                messages = [ChatMessageIn(**m) for m in history]
                hashes.append(for_worker(prefix_key("m", GenerateRequest(request_id="k", messages=messages))))
                reply = clients[(i + turn) % len(clients)].chat.completions.create(
                    model="m",
                    messages=history,  # type: ignore[arg-type]
                    max_tokens=args.max_tokens,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
                history.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
                usage = reply.usage
                details = getattr(usage, "prompt_tokens_details", None) if usage else None
                totals["requests"] += 1
                totals["prompt_tokens"] += usage.prompt_tokens if usage else 0
                totals["reported_cached"] += (getattr(details, "cached_tokens", 0) or 0) if details else 0

        started = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(converse, range(args.conversations)))
        seconds = time.monotonic() - started
        after = [counters(p) for p in ports]
        time.sleep(1.5)  # the last heartbeats
        reports = [set(httpx.get(f"http://127.0.0.1:{p}/worker/status").json()["prefix_hashes"]) for p in ports]
    later = [(a, b) for hashes in turns for a, b in zip(hashes, hashes[1:], strict=False)]
    followed = sum(any(a[-1] in r and b[-1] in r for r in reports) for a, b in later)
    computed = sum(a["lmfleet_worker_prefill_tokens_total"] - b["lmfleet_worker_prefill_tokens_total"]
                   for a, b in zip(after, before, strict=True))  # fmt: skip
    decoded = [a["lmfleet_worker_decode_tokens_total"] - b["lmfleet_worker_decode_tokens_total"]
               for a, b in zip(after, before, strict=True)]  # fmt: skip
    share = [round(d / max(sum(decoded), 1), 3) for d in decoded]
    return {
        "policy": policy,
        **totals,
        "computed_prompt_tokens": int(computed),
        "cached_tokens": int(totals["prompt_tokens"] - computed),
        "replica_share": share,
        "follow": round(followed / max(len(later), 1), 3),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="a GGUF file")
    p.add_argument("--policies", default="shortest_queue,cache_aware", help="comma-separated; the first is the base")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--api-servers", type=int, default=1)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--system-words", type=int, default=200, help="about this many words of shared system prompt")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads per worker")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        for policy in args.policies.split(","):
            result = run(args, policy, Path(tmp))
            results.append(result)
            print(json.dumps(result), flush=True)
    base = results[0]["cached_tokens"]
    summary = {
        "cached_ratio": [round(r["cached_tokens"] / base, 2) if base > 0 else None for r in results],
        "max_replica_share": [max(r["replica_share"]) for r in results],
    }
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
