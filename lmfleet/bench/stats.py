"""The statistics of `lmfleet bench`: what one request produced (`RequestResult`), one level's summary
(`LevelResult`: counts, tokens, rates, latency percentiles in milliseconds), and a --multi-turn run's
(`MultiTurnResult`: time to first token of first turns and of later turns apart, per turn too, and the prompt
tokens the server said it served from its cache).

Owns the percentile definition (linear interpolation between ranks, numpy's default) and which tokens count: a
level's output tokens are its successful requests' (each from the server's usage, or counted from chunks or words;
`token_source` says which). Does not own: sending requests (lmfleet.bench.load), printing (lmfleet.bench.report).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MAX_ERROR_MESSAGES = 5  # distinct error messages kept per level


@dataclass(frozen=True)
class Summary:
    """Distribution of one latency, in milliseconds."""

    n: int
    mean: float
    p50: float
    p95: float
    p99: float


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, interpolating linearly between ranks (numpy's
    default), so percentiles are monotone in q and lie within [min, max]."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def summarize(values_s: Sequence[float]) -> Summary | None:
    """Summarize durations given in seconds as milliseconds; None when there are none."""
    if not values_s:
        return None
    ms = sorted(v * 1000.0 for v in values_s)
    return Summary(
        n=len(ms),
        mean=sum(ms) / len(ms),
        p50=percentile(ms, 50),
        p95=percentile(ms, 95),
        p99=percentile(ms, 99),
    )


@dataclass
class RequestResult:
    """What one request produced. Times are seconds from sending the request."""

    ok: bool
    latency: float
    error: str | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    token_source: str = "usage"  # usage | chunks | words
    ttft: float | None = None  # first content chunk (streams only)
    itl: list[float] = field(default_factory=list)  # gaps between content chunks (streams only)
    cached_tokens: int | None = None  # prompt tokens the server served from its cache, when it says
    text: str = ""  # the answer (the first choice's), for a conversation's history


@dataclass
class LevelResult:
    """One row of the report: one concurrency level (or, with --raw, one batch size)."""

    concurrency: int
    requests: int
    ok: int
    errors: int
    error_messages: list[str]
    output_tokens: int
    prompt_tokens: int | None
    duration_s: float
    output_tok_s: float
    requests_per_s: float | None
    ttft_ms: Summary | None
    itl_ms: Summary | None
    e2e_ms: Summary | None
    token_source: dict[str, int]

    @classmethod
    def from_results(cls, concurrency: int, results: Sequence[RequestResult], duration_s: float) -> LevelResult:
        good = [r for r in results if r.ok]
        messages: list[str] = []
        for r in results:
            if not r.ok and r.error and r.error not in messages and len(messages) < MAX_ERROR_MESSAGES:
                messages.append(r.error)
        out = sum(r.output_tokens for r in good)
        prompts = [r.prompt_tokens for r in good if r.prompt_tokens is not None]
        sources: dict[str, int] = {}
        for r in good:
            sources[r.token_source] = sources.get(r.token_source, 0) + 1
        duration_s = max(duration_s, 1e-9)
        return cls(
            concurrency=concurrency,
            requests=len(results),
            ok=len(good),
            errors=len(results) - len(good),
            error_messages=messages,
            output_tokens=out,
            prompt_tokens=sum(prompts) if prompts else None,
            duration_s=duration_s,
            output_tok_s=out / duration_s,
            requests_per_s=len(good) / duration_s,
            ttft_ms=summarize([r.ttft for r in good if r.ttft is not None]),
            itl_ms=summarize([gap for r in good for gap in r.itl]),
            e2e_ms=summarize([r.latency for r in good]),
            token_source=sources,
        )


@dataclass(frozen=True)
class Quantiles:
    """p50 and p90 of one latency, in milliseconds (--multi-turn's summary)."""

    n: int
    p50: float
    p90: float

    @classmethod
    def of(cls, values_s: Sequence[float]) -> Quantiles | None:
        if not values_s:
            return None
        ms = sorted(v * 1000.0 for v in values_s)
        return cls(n=len(ms), p50=percentile(ms, 50), p90=percentile(ms, 90))


@dataclass
class TurnResult:
    """The requests of one turn (turn 1 is every user's first request)."""

    turn: int
    ok: int
    errors: int
    prompt_tokens: int | None  # summed over its successful requests, as the server counted them
    cached_tokens: int | None  # of those, served from the server's cache; None: the server never said
    ttft_ms: Quantiles | None

    @classmethod
    def from_results(cls, turn: int, results: Sequence[RequestResult]) -> TurnResult:
        good = [r for r in results if r.ok]
        return cls(
            turn=turn,
            ok=len(good),
            errors=len(results) - len(good),
            prompt_tokens=total(r.prompt_tokens for r in good),
            cached_tokens=total(r.cached_tokens for r in good),
            ttft_ms=Quantiles.of([r.ttft for r in good if r.ttft is not None]),
        )


@dataclass
class MultiTurnResult:
    """A --multi-turn run: `users` conversations of up to `turns` requests (a user whose turn failed stops there).
    Time to first token of the first turns (a prompt only the system prompt shares with others) apart from the later
    turns' (the whole history, mostly served from a prefix cache where the server has one)."""

    users: int
    turns: int
    requests: int
    ok: int
    errors: int
    error_messages: list[str]
    wall_s: float
    output_tokens: int
    output_tok_s: float
    requests_per_s: float
    prompt_tokens: int | None
    cached_tokens: int | None  # None: the server never said
    first_turn_ttft_ms: Quantiles | None
    later_turn_ttft_ms: Quantiles | None
    per_turn: list[TurnResult]

    @classmethod
    def from_results(
        cls, users: int, turns: int, results: Sequence[tuple[int, RequestResult]], wall_s: float
    ) -> MultiTurnResult:
        """`results`: (turn, result) for every request sent, turns from 1."""
        every = [r for _, r in results]
        good = [r for r in every if r.ok]
        messages: list[str] = []
        for r in every:
            if not r.ok and r.error and r.error not in messages and len(messages) < MAX_ERROR_MESSAGES:
                messages.append(r.error)
        wall_s = max(wall_s, 1e-9)
        out = sum(r.output_tokens for r in good)

        def ttfts(first: bool) -> Quantiles | None:
            return Quantiles.of([r.ttft for t, r in results if r.ok and r.ttft is not None and (t == 1) == first])

        return cls(
            users=users,
            turns=turns,
            requests=len(every),
            ok=len(good),
            errors=len(every) - len(good),
            error_messages=messages,
            wall_s=wall_s,
            output_tokens=out,
            output_tok_s=out / wall_s,
            requests_per_s=len(good) / wall_s,
            prompt_tokens=total(r.prompt_tokens for r in good),
            cached_tokens=total(r.cached_tokens for r in good),
            first_turn_ttft_ms=ttfts(first=True),
            later_turn_ttft_ms=ttfts(first=False),
            per_turn=[
                TurnResult.from_results(turn, [r for t, r in results if t == turn]) for turn in range(1, turns + 1)
            ],
        )


def total(values: Iterable[int | None]) -> int | None:
    """The sum of the values given; None when none is."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None
