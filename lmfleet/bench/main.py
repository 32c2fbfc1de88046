"""`lmfleet bench`'s `main`: parse, check the flags together, run the HTTP sweep or the raw decode, print the table
(and the JSON), and the exit status.

Does not own: the flags (lmfleet.bench.settings), running (lmfleet.bench.load, lmfleet.bench.raw), the output's
format (lmfleet.bench.report).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from lmfleet.bench.load import run_http, run_multi_turn
from lmfleet.bench.raw import run_raw
from lmfleet.bench.report import format_table, write_json
from lmfleet.bench.settings import BenchError, build_parser, settings_from_args


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 when every level (a multi-turn run: some turn) had at least one successful request, 1 when
    some level had none, 2 for a usage or setup error, 130 when interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.raw and not args.model_path:
        parser.error("--raw needs --model-path")
    if args.raw and args.prompt is not None:
        parser.error("--raw builds its own prompts: use --prompt-tokens, not --prompt")
    if args.model_path and not args.raw:
        parser.error("--model-path is only used with --raw")
    if args.multi_turn and (args.raw or args.endpoint != "chat"):
        parser.error("--multi-turn converses over chat: not with --raw or --endpoint completions")
    if args.multi_turn and not args.stream:
        parser.error("--multi-turn measures time to first token: not with --no-stream")
    if args.json_path not in (None, "-") and not os.path.isdir(os.path.dirname(args.json_path) or "."):
        parser.error(f"--json: directory of {args.json_path!r} does not exist")
    settings = settings_from_args(args)
    table_out: TextIO = sys.stderr if settings.json_path == "-" else sys.stdout
    try:
        if settings.raw:
            report = run_raw(settings)
        else:
            report = asyncio.run(run_multi_turn(settings) if settings.multi_turn else run_http(settings))
    except BenchError as exc:
        print(f"lmfleet bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmfleet bench: interrupted", file=sys.stderr)
        return 130
    print(format_table(report), file=table_out, flush=True)
    if settings.json_path:
        try:
            write_json(report, settings.json_path)
        except OSError as exc:
            print(f"lmfleet bench: error: cannot write {settings.json_path}: {exc}", file=sys.stderr)
            return 2
    return 0 if report.succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
