"""What `lmfleet bench` shows: the report (`BenchReport`), its terminal table and its JSON, and the progress bar
and status lines of a run (on stderr; none with --quiet).

Does not own: computing the figures (lmfleet.bench.stats), running (lmfleet.bench.load, lmfleet.bench.raw).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

from lmfleet.bench.settings import BenchSettings
from lmfleet.bench.stats import LevelResult, MultiTurnResult, total


@dataclass
class BenchReport:
    mode: str  # "http", "raw" or "multi-turn"
    config: dict[str, Any]
    levels: list[LevelResult]  # none in a multi-turn run
    multi_turn: MultiTurnResult | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"mode": self.mode, "config": self.config, "levels": [asdict(level) for level in self.levels]}
        if self.multi_turn is not None:
            out["multi_turn"] = asdict(self.multi_turn)
        return out

    @property
    def succeeded(self) -> bool:
        """Every level (a multi-turn run: some turn) had a successful request."""
        if self.multi_turn is not None:
            return self.multi_turn.ok > 0
        return all(level.ok > 0 for level in self.levels)


def progress(total: int, desc: str, settings: BenchSettings) -> Any:
    from tqdm import tqdm

    disable = settings.quiet or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=disable, leave=False)


def status(settings: BenchSettings, message: str) -> None:
    if not settings.quiet:
        print(message, file=sys.stderr, flush=True)


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(report: BenchReport) -> str:
    """Plain-text table, one row per level: TTFT and ITL in milliseconds, end-to-end latency in seconds. A
    multi-turn run's: `format_multi_turn`."""
    if report.multi_turn is not None:
        return format_multi_turn(report.multi_turn)
    columns: list[tuple[str, str, list[str]]] = [  # (group, header, cells)
        ("", "batch" if report.mode == "raw" else "conc", [str(lv.concurrency) for lv in report.levels]),
        ("", "ok", [str(lv.ok) for lv in report.levels]),
        ("", "err", [str(lv.errors) for lv in report.levels]),
        ("", "out tok", [str(lv.output_tokens) for lv in report.levels]),
        ("", "out tok/s", [_num(lv.output_tok_s) for lv in report.levels]),
        ("", "req/s", [_num(lv.requests_per_s, 2) for lv in report.levels]),
    ]
    for group, attr, scale, digits in (
        ("TTFT ms", "ttft_ms", 1, 1),
        ("ITL ms", "itl_ms", 1, 1),
        ("E2E s", "e2e_ms", 1000, 2),
    ):
        for q in ("p50", "p95", "p99"):
            cells = []
            for lv in report.levels:
                s = getattr(lv, attr)
                cells.append(_num(None if s is None else getattr(s, q) / scale, digits))
            columns.append((group, q, cells))

    widths = [max(len(header), *(len(c) for c in cells)) for _, header, cells in columns]
    # Group headers span their columns (joined by two spaces) and are centered over them.
    group_line: list[str] = []
    i = 0
    while i < len(columns):
        j = i
        while j < len(columns) and columns[j][0] == columns[i][0]:
            j += 1
        span = sum(widths[i:j]) + 2 * (j - i - 1)
        group_line.append(columns[i][0].center(span) if columns[i][0] else " " * span)
        i = j
    lines = ["  ".join(group_line).rstrip()]
    lines.append("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths, strict=True)))
    for row in range(len(report.levels)):
        lines.append("  ".join(cells[row].rjust(w) for (_, _, cells), w in zip(columns, widths, strict=True)))
    for lv in report.levels:
        if lv.errors:
            lines.append(f"level {lv.concurrency}: {lv.errors} of {lv.requests} requests failed:")
            lines.extend(f"  - {m}" for m in lv.error_messages)
    estimated = sorted({src for lv in report.levels for src in lv.token_source if src in ("chunks", "words")})
    if estimated:
        lines.append(f"note: no usage from the server; output tokens counted as {' and '.join(estimated)}")
    return "\n".join(lines)


def format_multi_turn(result: MultiTurnResult) -> str:
    """A multi-turn run: one line of totals, then a row per turn and one for the later turns together (prompt and
    cached tokens as the server counted them, time to first token in milliseconds)."""
    cached = "-" if result.cached_tokens is None else str(result.cached_tokens)
    lines = [
        f"{result.users} users x {result.turns} turns: {result.ok} ok, {result.errors} failed in "
        f"{result.wall_s:.2f} s; {result.output_tokens} output tokens, {result.output_tok_s:.1f} tok/s, "
        f"{result.requests_per_s:.2f} req/s; cached prompt tokens {cached} of {_count(result.prompt_tokens)}"
    ]
    rows = [
        (str(t.turn), str(t.ok), str(t.errors), _count(t.prompt_tokens), _count(t.cached_tokens), t.ttft_ms)
        for t in result.per_turn
    ]
    later = result.per_turn[1:]
    if later:
        rows.append(
            (
                "later",
                str(sum(t.ok for t in later)),
                str(sum(t.errors for t in later)),
                _count(total(t.prompt_tokens for t in later)),
                _count(total(t.cached_tokens for t in later)),
                result.later_turn_ttft_ms,
            )
        )
    header = ("turn", "ok", "err", "prompt tok", "cached tok", "TTFT p50 ms", "TTFT p90 ms")
    cells = [
        (*row[:5], _num(None if row[5] is None else row[5].p50), _num(None if row[5] is None else row[5].p90))
        for row in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    lines.extend("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)
    if result.errors:
        lines.append(f"{result.errors} of {result.requests} requests failed (a user stops at its failed turn):")
        lines.extend(f"  - {m}" for m in result.error_messages)
    return "\n".join(lines)


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def write_json(report: BenchReport, path: str) -> None:
    text = json.dumps(report.to_json(), indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
