"""Routing that finds the prompt cache, with real processes: two llama.cpp replicas of SmolLM2 behind an API server
dispatching `cache_aware`, several multi-turn conversations through the official client. Each conversation's later
turns reach the replica that served its first (seen in the replicas' decode counters), the conversations share the
replicas, and killing a replica mid-conversation moves its conversations, which keep answering."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Fleet
from tests.e2e.replicas import llamacpp_replicas
from tests.scrape import parse

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.timeout(300)

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}
QUESTIONS = {
    "fr": ["What is the capital of France?", "And its largest river?", "Name a famous museum there."],
    "jp": ["What is the capital of Japan?", "What is its most famous mountain?", "Name a dish from there."],
    "math": ["What is two plus two?", "And three times three?", "What is ten minus one?"],
    "sky": ["Why is the sky blue?", "Why are sunsets red?", "What colour is the sky on Mars?"],
}


@pytest.fixture(scope="module")
def fleet(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with llamacpp_replicas(
        smollm2_gguf, "smollm2", tmp_path_factory.mktemp("route"), api_args=("--dispatch-method", "cache_aware")
    ) as f:
        yield f


def decoded(port: int) -> float:
    """Tokens the replica has decoded so far (it grows only on the replica that serves a request)."""
    return parse(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text).value(
        "lmfleet_worker_decode_tokens_total"
    )


def test_conversations_stay_on_their_replica_and_move_when_it_dies(fleet: Fleet) -> None:
    client = openai.OpenAI(base_url=fleet.api_url + "/v1", api_key="none", max_retries=0)
    histories = {name: [SYSTEM] for name in QUESTIONS}
    served: dict[str, list[int]] = {name: [] for name in QUESTIONS}

    def say(name: str, question: str, ports: list[int]) -> int | None:
        """Ask the next question of conversation `name`; the replica of `ports` that answered it (None: another)."""
        before = [decoded(p) for p in ports]
        history = histories[name]
        history.append({"role": "user", "content": question})
        reply = client.chat.completions.create(model="smollm2", messages=history, max_tokens=16, temperature=0)
        answer = reply.choices[0].message.content
        assert answer
        history.append({"role": "assistant", "content": answer})
        grew = [i for i, p in enumerate(ports) if decoded(p) > before[i]]
        assert len(grew) <= 1, grew
        return grew[0] if grew else None

    for turn in range(2):
        for name, questions in QUESTIONS.items():
            served[name].append(say(name, questions[turn], fleet.ports))
    assert all(len(set(replicas)) == 1 and None not in replicas for replicas in served.values()), served
    homes = Counter(replicas[0] for replicas in served.values())
    assert sorted(homes.values()) == [2, 2], served  # new conversations go to the replica holding fewer

    victim = served["fr"][0]
    fleet.procs[f"worker-{victim}"].signal(signal.SIGKILL)
    survivor = fleet.ports[1 - victim]
    for name, questions in QUESTIONS.items():
        assert say(name, questions[2], [survivor]) == 0  # every conversation answers, on the survivor
