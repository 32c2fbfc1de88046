"""The statistics of `lmfleet bench`: what one request produced (`RequestResult`) and one level's summary
(`LevelResult`: counts, tokens, rates, latency percentiles in milliseconds).

Owns the percentile definition (linear interpolation between ranks, numpy's default) and which tokens count: a
level's output tokens are its successful requests' (each from the server's usage, or counted from chunks or words;
`token_source` says which). Does not own: sending requests (lmfleet.bench.load), printing (lmfleet.bench.report).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
