"""Replicas of a real GGUF behind one model name, as real processes, and the failover drill the real-model tests run
on them (tests/e2e/test_real_model.py with SmolLM2, tests/e2e/test_qwen_model.py with Qwen2.5-Coder-0.5B).

Owns: starting a controller, llama.cpp workers (one thread each: the machine has two cores) and an API server for
one name, and waiting until every replica is registered; asking a worker for its load; killing the replica that
serves a stream and holding the stream to going on, token-exact, on another. Does not own: the process helpers
(tests/conftest.py) or what the models are asked (the test modules).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.conftest import Fleet, free_port, wait_until


@contextlib.contextmanager
def llamacpp_replicas(
    gguf: Path, name: str, root: Path, *, replicas: int = 2, api_args: tuple[str, ...] = ()
) -> Iterator[Fleet]:
    """A fleet serving `gguf` as `name` on `replicas` llama.cpp workers (their ports in `fleet.ports`); `api_args`:
    more flags for the API server."""
    with Fleet(root=root) as f:
        f.controller()
        flags = ("--model-names", name, "--threads", "1", "--max-model-len", "1024")
        f.ports = [free_port() for _ in range(replicas)]
        for i, port in enumerate(f.ports):
            f.worker(f"worker-{i}", gguf, *flags, port=port)
        f.api("--inter-token-timeout", "5", *api_args)
        f.wait_models(1)
        wait_until(
            lambda: all(worker_status(p)["engine"] == "llamacpp" for p in f.ports),
            timeout=60,
            procs=list(f.procs.values()),
            what="every worker up",
        )
        wait_until(
            lambda: len(httpx.get(f.controller_url + "/workers").json()["workers"]) == replicas,
            timeout=30,
            procs=list(f.procs.values()),
            what=f"{replicas} workers listed",
        )
        yield f


def worker_status(port: int) -> dict[str, Any]:
    """A worker's load report; a probe that fails once (a busy loopback socket) is asked again."""
    for attempt in range(3):
        try:
            return httpx.get(f"http://127.0.0.1:{port}/worker/status", timeout=5).json()
        except httpx.TransportError:
            if attempt == 2:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


def assert_a_killed_stream_resumes_token_exact(
    fleet: Fleet, client: openai.OpenAI, model: str, messages: list[dict[str, str]], *, max_tokens: int = 64
) -> None:
    """Kill -9 the replica streaming a greedy answer after its first chunks: the stream goes on where it was cut on
    another replica, no token lost or repeated (usage counts exactly `max_tokens`, ignore_eos), one completion id,
    and the text after the cut is the undisturbed text. The other replica recomputes the sent tokens in one
    prefill, which llama.cpp's kernels do not make bit-equal to decoding them one by one, so greedy text may part
    from the undisturbed run at a near-tie far from the cut (seen once, 100 characters in): the first characters
    after the cut must be exact, and how far the two agree is printed. The killed replica stays dead."""
    body: dict[str, Any] = dict(
        model=model, messages=messages, temperature=0, max_tokens=max_tokens, extra_body={"ignore_eos": True}
    )
    undisturbed = client.chat.completions.create(**body).choices[0].message.content or ""
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **body)
    received = [next(stream) for _ in range(8)]
    cut = len("".join(c.choices[0].delta.content or "" for c in received if c.choices))
    serving = [i for i, p in enumerate(fleet.ports) if worker_status(p)["running"] > 0]
    assert len(serving) == 1
    victim = fleet.procs[f"worker-{serving[0]}"]
    victim.signal(signal.SIGKILL)
    received += list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    agree = len(os.path.commonprefix([text, undisturbed]))
    print(f"\n[{model}: resume on another replica] cut at {cut} chars; agrees with the undisturbed run for {agree}")
    assert agree >= min(cut + 12, len(undisturbed)), (text, undisturbed)
    assert received[-1].usage is not None and received[-1].usage.completion_tokens == max_tokens
    assert len({c.id for c in received}) == 1
    assert victim.popen is not None
    victim.popen.wait(10)
