"""The settings of `lmfleet bench` and its command line.

Owns `BenchSettings` (what one run is told; the API key never reaches the JSON report), the flags and their bounds
(`build_parser`; a bad value is a usage error, exit status 2), turning them into settings (`settings_from_args`),
and `BenchError`, a setup problem the user must fix. Does not own: checks across flags (lmfleet.bench.main), what a
request sends (lmfleet.bench.payload).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmfleet.bench.payload import ENDPOINTS

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_MAX_TOKENS = 64
MULTI_TURN_MAX_TOKENS = 32  # --multi-turn's default: short answers, so the history is mostly prompts


class BenchError(Exception):
    """A setup problem the user must fix (server unreachable, no model, missing engine); main() exits with 2."""


@dataclass(frozen=True)
class BenchSettings:
    base_url: str = DEFAULT_BASE_URL
    model: str | None = None  # None: the first model of GET /models
    api_key: str | None = field(default=None, repr=False)
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int | None = None  # per level; None: 2 x concurrency. Never fewer than the concurrency.
    prompt_tokens: int = 20
    prompt: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    endpoint: str = "chat"
    stream: bool = True
    ignore_eos: bool = False
    logprobs: int | None = None  # ask for log probabilities with this many alternatives per token
    temperature: float = 0.0
    response_format: dict[str, Any] | None = field(default=None, repr=False)  # chat: structured output
    timeout: float = 300.0  # seconds per request, end to end
    warmup: int = 1
    json_path: str | None = None  # "-" for stdout
    quiet: bool = False
    # --multi-turn: `users` conversations at once, each `turns` chat requests in a closed loop; every prompt is a
    # shared system prompt of about `system_tokens` words and the whole history (prompt_tokens words per user turn)
    multi_turn: bool = False
    users: int = 12
    turns: int = 4
    system_tokens: int = 300
    raw: bool = False
    model_path: str | None = None
    dtype: str = "float32"
    device: str = "cpu"

    def requests_for(self, concurrency: int) -> int:
        return max(self.requests if self.requests is not None else 2 * concurrency, concurrency)

    def public_config(self) -> dict[str, Any]:
        """The settings as recorded in the JSON report (never the API key; a run records only its mode's)."""
        cfg = asdict(self)
        del cfg["api_key"]
        if self.multi_turn:
            for key in ("concurrency", "requests"):
                del cfg[key]
            return cfg
        for key in ("multi_turn", "users", "turns", "system_tokens"):
            del cfg[key]
        cfg["concurrency"] = list(self.concurrency)
        cfg["requests_per_level"] = {str(c): self.requests_for(c) for c in self.concurrency}
        return cfg


def _concurrency_list(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4,16, got {text!r}") from None
    if not levels or any(c < 1 or c > 10_000 for c in levels):
        raise argparse.ArgumentTypeError(f"concurrency levels must be integers from 1 to 10000, got {text!r}")
    return levels


def _bounded(kind: type, low: float, high: float | None = None) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        return value

    return parse


def build_parser(prog: str = "lmfleet bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Load-test an OpenAI-compatible endpoint over a sweep of concurrency levels "
        "(or, with --raw, measure a model's own batched decode in process).",
    )
    target = p.add_argument_group("target")
    target.add_argument("--base-url", default=DEFAULT_BASE_URL, help="API root, ending in /v1 (default: %(default)s)")
    target.add_argument("--model", default=None, help="model name (default: the first of GET /models)")
    target.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY; none when unset)")
    target.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="chat", help="default: %(default)s")
    target.add_argument(
        "--stream", action=argparse.BooleanOptionalAction, default=True, help="stream responses (default: on)"
    )
    target.add_argument(
        "--timeout",
        type=_bounded(float, 0.001),
        default=300.0,
        help="seconds per request, end to end (default: %(default)s)",
    )

    load = p.add_argument_group("load")
    load.add_argument(
        "--concurrency", type=_concurrency_list, default=(1, 4, 16), help="levels to sweep, e.g. 1,4,16 (default)"
    )
    load.add_argument(
        "--requests",
        type=_bounded(int, 1, 1_000_000),
        default=None,
        help="requests per level (default: 2x the level; never fewer than the level)",
    )
    load.add_argument(
        "--warmup",
        type=_bounded(int, 0, 10_000),
        default=1,
        help="unmeasured requests sent before the sweep (default: %(default)s)",
    )
    prompt = load.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt-tokens",
        type=_bounded(int, 1, 1_000_000),
        default=20,
        help="approximate prompt length in words, different words per request (with --multi-turn: per user "
        "turn) (default: %(default)s)",
    )
    prompt.add_argument("--prompt", default=None, help="send this exact prompt in every request")
    load.add_argument(
        "--max-tokens",
        type=_bounded(int, 1, 10_000_000),
        default=None,
        help=f"default: {DEFAULT_MAX_TOKENS}; with --multi-turn, {MULTI_TURN_MAX_TOKENS} a turn",
    )
    load.add_argument("--temperature", type=_bounded(float, 0.0, 100.0), default=0.0, help="default: 0")
    load.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send the vLLM extension ignore_eos=true so every request generates exactly --max-tokens "
        "(real OpenAI rejects unknown fields)",
    )
    load.add_argument(
        "--logprobs",
        type=_bounded(int, 0, 20),
        default=None,
        metavar="K",
        help="ask for log probabilities with K alternatives per token (chat: logprobs + top_logprobs=K; "
        "completions: logprobs=K, at most 5 on OpenAI)",
    )

    load.add_argument(
        "--response-format",
        type=_response_format,
        default=None,
        metavar="json_object|SCHEMA",
        help="chat: ask for JSON (json_object) or JSON valid against a schema (a file, or inline JSON)",
    )

    conv = p.add_argument_group(
        "multi-turn (chat, streamed: users x turns in a closed loop instead of the concurrency sweep)"
    )
    conv.add_argument(
        "--multi-turn",
        action="store_true",
        help="each user sends turn t+1 once turn t is answered; every prompt is the shared system prompt and the "
        "whole history (earlier answers included); time to first token of first and of later turns apart",
    )
    conv.add_argument("--users", type=_bounded(int, 1, 10_000), default=12, help="conversations at once (default: 12)")
    conv.add_argument("--turns", type=_bounded(int, 1, 1_000), default=4, help="requests per user (default: 4)")
    conv.add_argument(
        "--system-tokens",
        type=_bounded(int, 0, 1_000_000),
        default=300,
        help="the shared system prompt's length in words, about as many tokens; 0: none (default: %(default)s)",
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--json", dest="json_path", metavar="PATH", default=None, help="write results as JSON (- for stdout)"
    )
    out.add_argument("--quiet", action="store_true", help="no progress bar or status lines")

    raw = p.add_argument_group("raw decode (in process, needs the worker extras)")
    raw.add_argument("--raw", action="store_true", help="measure the model's aligned-batch decode, batch = level")
    raw.add_argument("--model-path", default=None, help="model directory for --raw")
    raw.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="default: %(default)s")
    raw.add_argument("--device", default="cpu", help="default: %(default)s")
    return p


def _response_format(value: str) -> dict[str, Any]:
    """`--response-format`: json_object, or a JSON schema (inline, or a file holding one)."""
    if value == "json_object":
        return {"type": "json_object"}
    try:
        text = value if value.lstrip().startswith("{") else Path(value).read_text()
        schema = json.loads(text)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"not json_object, a JSON schema or a file holding one: {exc}") from None
    return {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema, "strict": True}}


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        base_url=args.base_url.rstrip("/"),
        model=args.model,
        api_key=args.api_key if args.api_key is not None else (os.environ.get("OPENAI_API_KEY") or None),
        concurrency=tuple(args.concurrency),
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        prompt=args.prompt,
        max_tokens=args.max_tokens
        if args.max_tokens is not None
        else (MULTI_TURN_MAX_TOKENS if args.multi_turn else DEFAULT_MAX_TOKENS),
        endpoint=args.endpoint,
        stream=args.stream,
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
        temperature=args.temperature,
        response_format=args.response_format,
        timeout=args.timeout,
        warmup=args.warmup,
        json_path=args.json_path,
        quiet=args.quiet,
        multi_turn=args.multi_turn,
        users=args.users,
        turns=args.turns,
        system_tokens=args.system_tokens,
        raw=args.raw,
        model_path=args.model_path,
        dtype=args.dtype,
        device=args.device,
    )
