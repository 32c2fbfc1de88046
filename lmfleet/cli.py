"""The one entry point: `lmfleet controller|worker|api|serve|bench|make-test-model`.

`python -m lmfleet.controller`, `python -m lmfleet.worker` and `python -m lmfleet.api` land here too, with
FastChat's flag names, so a FastChat user's command lines keep working. Owns argument parsing and turning
flags into each app's settings; nothing else. Secrets may come from the environment (LMFLEET_API_KEYS,
LMFLEET_REGISTRATION_SECRET) or a file, so they need not appear in `ps`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_CONTROLLER = "http://127.0.0.1:21001"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _common(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _secret_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registration-secret",
        default=None,
        help="shared secret workers present to the controller (default: $LMFLEET_REGISTRATION_SECRET)",
    )


def _registration_secret(args: argparse.Namespace) -> str | None:
    return args.registration_secret or os.environ.get("LMFLEET_REGISTRATION_SECRET") or None


def _api_keys(args: argparse.Namespace) -> list[str] | None:
    keys: list[str] = []
    if args.api_keys:
        keys += _csv(args.api_keys)
    if os.environ.get("LMFLEET_API_KEYS"):
        keys += _csv(os.environ["LMFLEET_API_KEYS"])
    if args.api_key_file:
        keys += [ln.strip() for ln in Path(args.api_key_file).read_text().splitlines() if ln.strip()]
    return keys or None


def add_controller_args(p: argparse.ArgumentParser) -> None:
    _common(p, 21001)
    p.add_argument("--dispatch-method", default="shortest_queue", help="shortest_queue (default) or lottery")
    p.add_argument("--heartbeat-expiration", type=float, default=6.0,
                   help="seconds without a heartbeat before a worker is dropped")
    _secret_flag(p)
    p.add_argument("--allowed-worker-networks", type=_csv, default=None,
                   help="comma-separated CIDRs workers may register from, e.g. 10.0.0.0/8,127.0.0.0/8")


_FASTCHAT_SWITCHES = {"--load-8bit", "--cpu-offloading", "--embed-in-truncate", "--debug", "--allow-credentials"}


def _fastchat_ignored(p: argparse.ArgumentParser, *flags: str) -> None:
    """FastChat flags with no lmfleet meaning: accepted, so a FastChat command line still starts, and reported
    once at start-up (`warn_ignored`)."""
    g = p.add_argument_group("FastChat flags accepted and ignored")
    for flag in flags:
        dest = "ignored_" + flag.lstrip("-").replace("-", "_")
        if flag in _FASTCHAT_SWITCHES:
            g.add_argument(flag, dest=dest, action="store_true", help=argparse.SUPPRESS)
        else:
            g.add_argument(flag, dest=dest, default=None, help=argparse.SUPPRESS)


def warn_ignored(args: argparse.Namespace) -> None:
    for name, value in vars(args).items():
        if name.startswith("ignored_") and value not in (None, False):
            flag = "--" + name.removeprefix("ignored_").replace("_", "-")
            note = " (the model's own chat template is used)" if flag == "--conv-template" else ""
            logging.getLogger("lmfleet").warning("%s is a FastChat flag lmfleet ignores%s", flag, note)


def add_worker_args(p: argparse.ArgumentParser, *, serve: bool = False) -> None:
    if not serve:
        _common(p, 21002)
        p.add_argument("--model-path", required=True, help="local folder or hub id of a transformers model")
        p.add_argument("--model-names", type=_csv, default=None,
                       help="comma-separated names to serve the model under (default: --model-path as given)")
        p.add_argument("--worker-address", default=None, help="URL others reach this worker at "
                       "(default http://HOST:PORT; set it when binding 0.0.0.0)")
        p.add_argument("--controller-address", type=_csv, default=[DEFAULT_CONTROLLER],
                       help="controller URL(s), comma-separated")
        p.add_argument("--no-register", action="store_true", help="do not register with a controller")
        _secret_flag(p)
        p.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM the worker leaves its "
                       "controllers and answers new requests 503; running ones get this many seconds to finish")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together in one batch")
    p.add_argument("--max-batch-tokens", type=int, default=1024, help="prompt tokens prefilled per step")
    p.add_argument("--limit-worker-concurrency", type=int, default=256,
                   help="requests running + queued before the worker answers 429")
    p.add_argument("--max-model-len", type=int, default=None, help="cap on prompt + output tokens")
    p.add_argument("--heartbeat-interval", type=float, default=2.0)
    _fastchat_ignored(p, "--conv-template", "--num-gpus", "--gpus", "--max-gpu-memory", "--stream-interval",
                      "--seed", "--load-8bit", "--cpu-offloading", "--embed-in-truncate", "--debug")


def add_api_args(p: argparse.ArgumentParser, *, serve: bool = False) -> None:
    if not serve:
        _common(p, 8000)
        _fastchat_ignored(p, "--allow-credentials", "--allowed-methods", "--allowed-headers")
        p.add_argument("--controller-address", default=DEFAULT_CONTROLLER, help="controller URL(s), comma-separated; "
                       "the first that answers gives the list of workers, which is kept while none answers")
        _secret_flag(p)
        p.add_argument("--dispatch-method", default="shortest_queue",
                       help="how a worker is picked from the API server's view: shortest_queue (default) or lottery")
        p.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM the server answers new "
                       "requests 503; running ones get this many seconds to finish")
    _limit_flags(p)
    p.add_argument("--first-token-timeout", type=float, default=60.0, help="seconds a worker may take to send "
                   "its first chunk (queue + prefill) before the request moves to another worker")
    p.add_argument("--inter-token-timeout", type=float, default=30.0, help="seconds a worker may stay silent "
                   "mid-stream before the generation is resumed on another worker")
    p.add_argument("--api-keys", default=None, help="comma-separated keys clients must send as Bearer tokens "
                   "(also $LMFLEET_API_KEYS; prefer --api-key-file to keep keys out of `ps`)")
    p.add_argument("--api-key-file", default=None, help="file with one API key per line")
    p.add_argument("--default-model", default=None, help="model used when a request names none")
    p.add_argument("--allowed-origins", "--allow-origins", dest="allowed_origins", type=_csv, default=None,
                   help="CORS origins, comma-separated (default: CORS off)")


API_PASSTHROUGH = ("max_request_bytes", "max_n", "max_stop", "max_stop_chars", "max_messages", "max_message_chars",
                   "first_token_timeout", "inter_token_timeout")  # what `lmfleet serve` forwards to its API server


def _limit_flags(p: argparse.ArgumentParser) -> None:
    """The API server's request limits (lmfleet.api.access.RequestLimits); each can only be lowered from its
    default, which is also the most the API accepts."""
    from lmfleet.api.access import RequestLimits

    d = RequestLimits()
    g = p.add_argument_group("request limits (each over-limit request is a 4xx naming the parameter)")
    g.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024, help="request body size (413 beyond)")
    g.add_argument("--max-n", type=int, default=d.max_n, help="choices per request (`n`)")
    g.add_argument("--max-stop", type=int, default=d.max_stop, help="stop sequences per request")
    g.add_argument("--max-stop-chars", type=int, default=d.max_stop_chars, help="characters per stop sequence")
    g.add_argument("--max-messages", type=int, default=d.max_messages, help="messages per chat request")
    g.add_argument("--max-message-chars", type=int, default=d.max_message_chars,
                   help="characters in one message's content or one prompt")


class _NoQueryStrings(logging.Filter):
    """uvicorn's access log prints each request's query string. No lmfleet route takes one, but a client may put
    a key there (`?api_key=...`), and a secret must never reach a log: keep the path, drop the query."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?[query removed]", *args[3:])
        return True


def _uvicorn_log_config() -> dict:
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["no_query_strings"] = {"()": _NoQueryStrings}
    config["handlers"]["access"]["filters"] = ["no_query_strings"]
    return config


def _run_app(app: object, args: argparse.Namespace) -> int:
    """uvicorn, with a drain phase when the app has one (`app.state.drain`, an async callable): the first SIGTERM
    or SIGINT awaits it (the app refuses new requests and lets running ones finish) before uvicorn's graceful
    shutdown; a second signal skips the rest of it."""
    import asyncio

    import uvicorn

    drain = getattr(getattr(app, "state", None), "drain", None)

    class Server(uvicorn.Server):
        _loop: asyncio.AbstractEventLoop | None = None
        _drain_task: asyncio.Future[None] | None = None

        async def serve(self, sockets=None) -> None:  # noqa: ANN001
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:  # noqa: ANN001 -- a signal handler, on the loop's thread
            if drain is None or self._loop is None or self._drain_task is not None or self.should_exit:
                super().handle_exit(sig, frame)
                return
            self._loop.call_soon_threadsafe(self._start_drain, sig)

        def _start_drain(self, sig: int) -> None:
            if self._drain_task is None:
                self._drain_task = asyncio.ensure_future(self._drain_then_exit(sig))

        async def _drain_then_exit(self, sig: int) -> None:
            try:
                await drain()
            except Exception:
                logging.getLogger("lmfleet").exception("drain failed")
            super().handle_exit(sig, None)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            log_config=_uvicorn_log_config(),  # no query strings in the access log
                            timeout_graceful_shutdown=10 if drain is None else 2)
    server = Server(config)
    server.run()
    if not server.started:
        return 3  # uvicorn's STARTUP_FAILURE
    return 0


def run_controller(args: argparse.Namespace) -> int:
    from lmfleet.controller.app import ControllerSettings, create_app

    settings = ControllerSettings(
        dispatch_policy=args.dispatch_method,
        heartbeat_expiry_s=args.heartbeat_expiration,
        registration_secret=_registration_secret(args),
        allowed_worker_networks=args.allowed_worker_networks,
    )
    return _run_app(create_app(settings), args)


def worker_settings(args: argparse.Namespace, **overrides: object):  # -> WorkerSettings
    from lmfleet.worker.app import WorkerSettings

    fields = dict(
        model_path=args.model_path,
        model_names=args.model_names,
        worker_address=args.worker_address or f"http://{args.host}:{args.port}",
        controller_addresses=[] if args.no_register else args.controller_address,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=args.max_num_seqs,
        max_batch_tokens=args.max_batch_tokens,
        max_queued=args.limit_worker_concurrency,
        max_model_len=args.max_model_len,
        heartbeat_interval_s=args.heartbeat_interval,
        registration_secret=_registration_secret(args),
        drain_timeout_s=args.drain_timeout,
    )
    fields.update(overrides)
    return WorkerSettings(**fields)  # type: ignore[arg-type]


def run_worker(args: argparse.Namespace) -> int:
    from lmfleet.worker.app import create_app

    return _run_app(create_app(worker_settings(args)), args)


def api_settings(args: argparse.Namespace):  # -> ApiSettings
    from lmfleet.api.access import RequestLimits
    from lmfleet.api.app import ApiSettings

    limits = RequestLimits(
        max_n=args.max_n,
        max_stop=args.max_stop,
        max_stop_chars=args.max_stop_chars,
        max_messages=args.max_messages,
        max_message_chars=args.max_message_chars,
    )
    return ApiSettings(
        controller_address=args.controller_address,
        api_keys=_api_keys(args),
        default_model=args.default_model,
        allow_origins=args.allowed_origins,
        registration_secret=_registration_secret(args),
        max_request_bytes=args.max_request_bytes,
        limits=limits,
        dispatch_policy=args.dispatch_method,
        first_token_timeout_s=args.first_token_timeout,
        inter_token_timeout_s=args.inter_token_timeout,
        drain_timeout_s=args.drain_timeout,
    )


def run_api(args: argparse.Namespace) -> int:
    from lmfleet.api.app import create_app

    try:
        settings = api_settings(args)
    except ValueError as exc:
        raise SystemExit(f"lmfleet api: {exc}") from None
    return _run_app(create_app(settings), args)


def run_serve(args: argparse.Namespace) -> int:
    from lmfleet import serve

    return serve.run(args)


def run_make_test_model(argv: Sequence[str]) -> int:
    from lmfleet import testmodel

    return testmodel.main(list(argv)) or 0


def run_bench(argv: Sequence[str]) -> int:
    from lmfleet import bench

    return bench.main(list(argv)) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmfleet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_controller_args(sub.add_parser("controller", help="run the controller (default :21001)"))
    add_worker_args(sub.add_parser("worker", help="run a model worker (default :21002)"))
    add_api_args(sub.add_parser("api", help="run the OpenAI-compatible API server (default :8000)"))
    from lmfleet.serve import add_serve_args

    add_serve_args(sub.add_parser("serve", help="run controller, worker(s) and API server together"))
    sub.add_parser("bench", help="load-test an OpenAI-compatible endpoint (see `lmfleet bench --help`)",
                   add_help=False)
    sub.add_parser("make-test-model", help="build a tiny random model for tests and demos", add_help=False)
    return parser


RUNNERS = {"controller": run_controller, "worker": run_worker, "api": run_api, "serve": run_serve}
PASSTHROUGH = {"bench": run_bench, "make-test-model": run_make_test_model}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:  # these parse their own flags
        return PASSTHROUGH[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per internal request drowns the log
    warn_ignored(args)
    return RUNNERS[args.command](args)


def module_main(command: str) -> None:
    """`python -m lmfleet.<command>`."""
    raise SystemExit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    raise SystemExit(main())
