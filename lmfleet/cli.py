"""The one entry point: `lmfleet controller|worker|api|serve|bench|chat|make-test-model|model-path`.

`python -m lmfleet.controller`, `python -m lmfleet.worker` and `python -m lmfleet.api` land here too, with
FastChat's flag names, so a FastChat user's command lines keep working. Owns dispatching a command to its part,
`serve`'s flags, and turning them into a `ServePlan` (the command lines of the children) that lmfleet.serve runs.

Does not own: each part's flags and settings (lmfleet.controller.flags, lmfleet.worker.flags, lmfleet.api.flags,
which read each default from the settings it belongs to), the flags they share (lmfleet.flags), the commands that
parse their own flags (bench, chat, make-test-model, model-path). A part's flags are imported when a parser is
built, so those commands start without loading any app.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lmfleet import flags

if TYPE_CHECKING:
    from lmfleet.serve import ServePlan

# `lmfleet --help`'s first line
DESCRIPTION = (
    "The one entry point, and every flag: `lmfleet controller|worker|api|serve|bench|chat|make-test-model|model-path`."
)

# -- serve ------------------------------------------------------------------------------------------------------

# Flags `serve` hands to every worker and to its API server, as (flag, args attribute).
_ENGINE_FLAGS = (
    ("--engine", "engine"),
    ("--max-num-seqs", "max_num_seqs"),
    ("--max-batch-tokens", "max_batch_tokens"),
    ("--max-model-len", "max_model_len"),
    ("--threads", "threads"),
    ("--prefix-cache-host-bytes", "prefix_cache_host_bytes"),
    ("--device", "device"),
    ("--dtype", "dtype"),
    ("--spec-type", "spec_type"),
    ("--draft-model-path", "draft_model_path"),
    ("--spec-draft-n-max", "spec_draft_n_max"),
    ("--spec-draft-n-min", "spec_draft_n_min"),
    ("--spec-ngram-size-n", "spec_ngram_size_n"),
    ("--spec-ngram-min-n", "spec_ngram_min_n"),
    ("--spec-max-running", "spec_max_running"),
    ("--spec-verify-cost", "spec_verify_cost"),
    ("--tool-parser", "tool_parser"),
    ("--reasoning-parser", "reasoning_parser"),
    ("--limit-worker-concurrency", "limit_worker_concurrency"),
    ("--heartbeat-interval", "heartbeat_interval"),
)
_API_FLAGS = (
    ("--max-request-bytes", "max_request_bytes"),
    ("--max-n", "max_n"),
    ("--max-stop", "max_stop"),
    ("--max-stop-chars", "max_stop_chars"),
    ("--max-messages", "max_messages"),
    ("--max-message-chars", "max_message_chars"),
    ("--first-token-timeout", "first_token_timeout"),
    ("--inter-token-timeout", "inter_token_timeout"),
    ("--model-load-timeout", "model_load_timeout"),
    ("--default-model", "default_model"),
    ("--responses-db", "responses_db"),
)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from lmfleet.api import flags as api_flags
    from lmfleet.controller import flags as controller_flags
    from lmfleet.dispatch import DEFAULT_POLICY, POLICIES
    from lmfleet.models import DEFAULT_MODEL, DEMO_MODEL_NAME
    from lmfleet.worker import flags as worker_flags

    p.add_argument("--host", default="127.0.0.1", help="address the API server binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=api_flags.PORT, help="API server port")
    flags.add_log_args(p)
    p.add_argument(
        "--model-path",
        action="append",
        default=[],
        help="a model to serve; repeat for several "
        f"(default: {DEFAULT_MODEL}, a real model installed as a Python package, when nothing is given)",
    )
    p.add_argument(
        "--model-names",
        action="append",
        default=None,
        help="names for the matching --model-path (comma-separated); repeat in the same order",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help=f"also serve a tiny random model as '{DEMO_MODEL_NAME}' (no download; output is noise)",
    )
    p.add_argument(
        "--demo-dir",
        default=str(Path.home() / ".cache" / "lmfleet" / "demo-model"),
        help="where --demo builds its model",
    )
    p.add_argument("--controller-port", type=int, default=controller_flags.PORT)
    p.add_argument(
        "--worker-port", type=int, default=worker_flags.PORT, help="first worker's port; the next ones count up"
    )
    p.add_argument("--dispatch-method", default=DEFAULT_POLICY, choices=sorted(POLICIES))
    worker_flags.add_engine_args(p)
    p.add_argument("--limit-worker-concurrency", type=int, default=None)
    p.add_argument("--heartbeat-interval", type=float, default=None)
    api_flags.add_client_args(p)


def _flags(args: argparse.Namespace, pairs: Sequence[tuple[str, str]]) -> list[str]:
    return [s for flag, name in pairs if getattr(args, name) is not None for s in (flag, str(getattr(args, name)))]


def serve_plan(args: argparse.Namespace) -> ServePlan:
    """The children of `lmfleet serve`, controller first, as the same `python -m lmfleet.<part>` command lines a
    multi-host deployment runs."""
    from lmfleet import models
    from lmfleet.engine import registry
    from lmfleet.serve import Child, ServePlan

    given: list[tuple[str, str | None]] = [(m, None) for m in args.model_path]
    for i, names in enumerate(args.model_names or []):
        if i < len(given):
            given[i] = (given[i][0], names)
    if not given and not args.demo:
        try:
            given = [(str(models.packaged(models.DEFAULT_MODEL)), models.DEFAULT_MODEL)]
        except LookupError as exc:
            raise SystemExit(f"lmfleet serve: {exc}; or give --model-path PATH, or --demo") from None
    if args.demo:
        given.append((str(models.demo_model(Path(args.demo_dir))), models.DEMO_MODEL_NAME))
    for path, _ in given:  # one line now, not a traceback from a child after it loaded half the fleet
        try:
            registry.choose(registry.locate(path), args.engine)
        except ValueError as exc:
            raise SystemExit(f"lmfleet serve: {exc}") from None
    py = [sys.executable, "-m"]
    controller = f"http://127.0.0.1:{args.controller_port}"
    log = ["--log-level", args.log_level, "--log-format", args.log_format]
    children = [
        Child(
            "controller",
            py
            + ["lmfleet.controller", "--port", str(args.controller_port), "--dispatch-method", args.dispatch_method]
            + log,
        )
    ]
    served: set[str] = set()
    for i, (path, model_names) in enumerate(given):
        cmd = (
            py
            + [
                "lmfleet.worker",
                "--port",
                str(args.worker_port + i),
                "--model-path",
                path,
                "--controller-address",
                controller,
            ]
            + _flags(args, _ENGINE_FLAGS)
            + log
        )
        if not args.flash_attn:
            cmd.append("--no-flash-attn")
        if args.matryoshka:
            cmd.append("--matryoshka")
        if not args.prefix_cache:
            cmd.append("--no-prefix-cache")
        if args.deterministic:
            cmd.append("--deterministic")
        if model_names:
            cmd += ["--model-names", model_names]
        served.update(flags.csv(model_names) if model_names else [path])
        children.append(Child(f"worker {i + 1}", cmd))
    api = py + ["lmfleet.api", "--host", args.host, "--port", str(args.port), "--controller-address", controller]
    api += ["--dispatch-method", args.dispatch_method]  # the API server dispatches too, from its own view
    if args.allowed_origins:
        api += ["--allowed-origins", ",".join(args.allowed_origins)]
    if args.no_responses_store:
        api.append("--no-responses-store")
    if args.metrics_public:
        api.append("--metrics-public")
    api += ["--expect-models", ",".join(sorted(served))]  # 503 while they start, not 404
    children.append(Child("api", api + _flags(args, _API_FLAGS) + log))
    env = {"LMFLEET_REGISTRATION_SECRET": os.environ.get("LMFLEET_REGISTRATION_SECRET") or secrets.token_urlsafe(24)}
    keys = flags.api_keys(args)
    if keys:
        env["LMFLEET_API_KEYS"] = ",".join(keys)  # through the environment, not argv: keys stay out of `ps`
    admin = flags.admin_keys(args)
    if admin:
        env["LMFLEET_ADMIN_KEYS"] = ",".join(admin)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    return ServePlan(
        children, api_url=f"http://{host}:{args.port}", models=served, env=env, api_key=keys[0] if keys else None
    )


# -- running ----------------------------------------------------------------------------------------------------


def run_controller(args: argparse.Namespace) -> int:
    from lmfleet import server
    from lmfleet.controller import flags as controller_flags
    from lmfleet.controller.app import create_app

    settings = controller_flags.settings(args)
    sock = server.bind("controller", args.host, args.port)
    app = create_app(settings)
    return server.run(app, name="controller", sock=sock, log_level=args.log_level, log_format=args.log_format)


def run_worker(args: argparse.Namespace) -> int:
    from lmfleet import server
    from lmfleet.drain import Drain
    from lmfleet.worker import flags as worker_flags

    if worker_flags.multi_model(args):
        from lmfleet.worker import multi

        several = worker_flags.multi_settings(args)
        sock = server.bind("worker", args.host, args.port)
        drain = Drain(several.drain_timeout_s)
        app = multi.create_app(several, drain=drain)
    else:
        settings = worker_flags.settings(args)  # first: one line when the engine's extra is missing
        from lmfleet.worker.app import create_app

        sock = server.bind("worker", args.host, args.port)
        drain = Drain(settings.drain_timeout_s)
        app = create_app(settings, drain=drain)
    return server.run(app, name="worker", sock=sock, drain=drain, log_level=args.log_level, log_format=args.log_format)


def run_api(args: argparse.Namespace) -> int:
    from lmfleet import server
    from lmfleet.api import flags as api_flags
    from lmfleet.api.app import create_app
    from lmfleet.drain import Drain

    settings = api_flags.settings(args)
    sock = server.bind("api", args.host, args.port)
    drain = Drain(settings.drain_timeout_s)
    app = create_app(settings, drain=drain)
    return server.run(app, name="api", sock=sock, drain=drain, log_level=args.log_level, log_format=args.log_format)


def run_serve(args: argparse.Namespace) -> int:
    from lmfleet import serve

    return serve.run(serve_plan(args))


def run_make_test_model(argv: Sequence[str]) -> int:
    from lmfleet import testmodel

    return testmodel.main(list(argv)) or 0


def run_bench(argv: Sequence[str]) -> int:
    from lmfleet.bench.main import main as bench

    return bench(list(argv)) or 0


def run_chat(argv: Sequence[str]) -> int:
    from lmfleet import chat

    return chat.main(list(argv))


def run_model_path(argv: Sequence[str]) -> int:
    from lmfleet import models

    return models.main(list(argv))


def build_parser() -> argparse.ArgumentParser:
    from lmfleet.api import flags as api_flags
    from lmfleet.controller import flags as controller_flags
    from lmfleet.worker import flags as worker_flags

    parser = argparse.ArgumentParser(prog="lmfleet", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    controller_flags.add_args(
        sub.add_parser("controller", help=f"run the controller (default :{controller_flags.PORT})")
    )
    worker_flags.add_args(sub.add_parser("worker", help=f"run a model worker (default :{worker_flags.PORT})"))
    api_flags.add_args(sub.add_parser("api", help=f"run the OpenAI-compatible API server (default :{api_flags.PORT})"))
    add_serve_args(sub.add_parser("serve", help="run controller, worker(s) and API server together"))
    sub.add_parser("bench", help="load-test an OpenAI-compatible endpoint (see `lmfleet bench --help`)", add_help=False)
    sub.add_parser("chat", help="chat in the terminal with an OpenAI-compatible endpoint", add_help=False)
    sub.add_parser("make-test-model", help="build a tiny random model for tests and demos", add_help=False)
    sub.add_parser("model-path", help="print the path of a model installed as a Python package", add_help=False)
    return parser


RUNNERS = {"controller": run_controller, "worker": run_worker, "api": run_api, "serve": run_serve}
PASSTHROUGH = {
    "bench": run_bench,
    "chat": run_chat,
    "make-test-model": run_make_test_model,
    "model-path": run_model_path,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:  # these parse their own flags
        return PASSTHROUGH[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    from lmfleet import server

    server.configure_logging(args.log_level, args.log_format)
    flags.warn_ignored(args)
    return RUNNERS[args.command](args)


def module_main(command: str) -> None:
    """`python -m lmfleet.<command>`."""
    raise SystemExit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    raise SystemExit(main())
