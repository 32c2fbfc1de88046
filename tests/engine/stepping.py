"""Driving an engine through `step()` the way the runner does, for the engine tests."""

from __future__ import annotations

from collections.abc import Iterable

from lmfleet.engine.base import Engine, EngineOutput, EngineRequest


def drive(
    engine: Engine, requests: Iterable[EngineRequest], join_at: Iterable[int] | None = None
) -> tuple[dict[str, list[int]], dict[str, EngineOutput]]:
    """Add each request at its step, step until idle; return tokens and final output per request."""
    requests = list(requests)
    pending = sorted(zip(join_at or [0] * len(requests), range(len(requests)), strict=True))
    tokens: dict[str, list[int]] = {}
    final: dict[str, EngineOutput] = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            engine.add_request(requests[pending.pop(0)[1]])
        for out in engine.step():
            assert out.request_id not in final, "output after the final one"
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                final[out.request_id] = out
        step += 1
        assert step < 10_000
    assert set(final) == set(tokens) >= {r.request_id for r in requests}
    return tokens, final
