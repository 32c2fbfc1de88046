"""The one entry point, and every flag: `lmfleet controller|worker|api|serve|bench|chat|make-test-model|model-path`.

`python -m lmfleet.controller`, `python -m lmfleet.worker` and `python -m lmfleet.api` land here too, with
FastChat's flag names, so a FastChat user's command lines keep working. Owns all argument parsing and turning flags
into each app's settings, or, for `serve`, into a `ServePlan` (the command lines of the children) that
lmfleet.serve runs. Each default lives once, in the settings it belongs to (lmfleet.controller.app,
lmfleet.worker.app, lmfleet.api.app, the engines' settings); the flags read it from there. Secrets may come from
the environment (LMFLEET_API_KEYS, LMFLEET_REGISTRATION_SECRET, LMFLEET_ETCD_PASSWORD) or a file, so they need not
appear in `ps`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmfleet.client import DEFAULT_CONTROLLER

CONTROLLER_PORT, WORKER_PORT, API_PORT = 21001, 21002, 8000  # FastChat's ports

logger = logging.getLogger("lmfleet")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _default(cls: type, name: str) -> Any:
    """The default of settings field `name`, where it is defined."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _log_args(p: argparse.ArgumentParser) -> None:
    from lmfleet.server import LOG_FORMATS

    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format", default="text", choices=LOG_FORMATS, help="json: one object per line, for log shippers"
    )


def _common(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=port)
    _log_args(p)


def _secret_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registration-secret",
        default=None,
        help="shared secret workers present to the controller (default: $LMFLEET_REGISTRATION_SECRET)",
    )


def registration_secret(args: argparse.Namespace) -> str | None:
    return args.registration_secret or os.environ.get("LMFLEET_REGISTRATION_SECRET") or None


def api_keys(args: argparse.Namespace) -> list[str] | None:
    keys: list[str] = []
    if args.api_keys:
        keys += _csv(args.api_keys)
    if os.environ.get("LMFLEET_API_KEYS"):
        keys += _csv(os.environ["LMFLEET_API_KEYS"])
    if args.api_key_file:
        keys += [ln.strip() for ln in Path(args.api_key_file).read_text().splitlines() if ln.strip()]
    return keys or None


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
            logger.warning("%s is a FastChat flag lmfleet ignores%s", flag, note)


# -- controller -------------------------------------------------------------------------------------------------


def add_controller_args(p: argparse.ArgumentParser) -> None:
    from lmfleet.controller.app import ControllerSettings
    from lmfleet.dispatch import DEFAULT_POLICY, POLICIES

    _common(p, CONTROLLER_PORT)
    p.add_argument(
        "--dispatch-method",
        default=DEFAULT_POLICY,
        choices=sorted(POLICIES),
        help=f"how a worker is picked per request (default {DEFAULT_POLICY})",
    )
    expiry = _default(ControllerSettings, "heartbeat_expiry_s")
    p.add_argument(
        "--heartbeat-expiration",
        type=float,
        default=expiry,
        help=f"seconds without a heartbeat before a worker is dropped (default {expiry:g})",
    )
    _secret_flag(p)
    p.add_argument(
        "--allowed-worker-networks",
        type=_csv,
        default=None,
        help="comma-separated CIDRs workers may register from, e.g. 10.0.0.0/8,127.0.0.0/8",
    )
    g = p.add_argument_group("the fleet in etcd (several controllers serve one fleet)")
    g.add_argument(
        "--registry",
        default=None,
        metavar="etcd://HOST:PORT[,HOST:PORT...]",
        help="keep the fleet's registrations in etcd (default: in this process's memory)",
    )
    g.add_argument("--etcd-prefix", default=None, help="key prefix of the fleet's workers (default /lmfleet/workers/)")
    g.add_argument("--etcd-user", default=None, help="etcd user (default: $LMFLEET_ETCD_USER)")
    g.add_argument(
        "--etcd-password", default=None, help="etcd password (default: $LMFLEET_ETCD_PASSWORD, which stays out of ps)"
    )
    g.add_argument("--etcd-ca-file", default=None, help="TLS: CA certificate(s) that signed etcd's certificate")
    g.add_argument("--etcd-cert-file", default=None, help="TLS: this controller's client certificate")
    g.add_argument("--etcd-key-file", default=None, help="TLS: the client certificate's key")


def etcd_settings(args: argparse.Namespace) -> Any:  # lmfleet.controller.etcd.EtcdSettings | None
    if not args.registry:
        return None
    try:
        from lmfleet.controller.etcd import EtcdSettings
    except ImportError as exc:
        hint = "pip install 'lmfleet[etcd]'"
        raise SystemExit(f"lmfleet controller: --registry needs the etcd extra ({hint}): {exc}") from None
    given = {
        "prefix": args.etcd_prefix,
        "user": args.etcd_user or os.environ.get("LMFLEET_ETCD_USER") or None,
        "password": args.etcd_password or os.environ.get("LMFLEET_ETCD_PASSWORD") or None,
        "ca_file": args.etcd_ca_file,
        "cert_file": args.etcd_cert_file,
        "key_file": args.etcd_key_file,
    }
    try:
        return EtcdSettings.from_url(args.registry, **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise SystemExit(f"lmfleet controller: {exc}") from None


def controller_settings(args: argparse.Namespace) -> Any:  # ControllerSettings
    from lmfleet.controller.app import ControllerSettings

    return ControllerSettings(
        dispatch_policy=args.dispatch_method,
        heartbeat_expiry_s=args.heartbeat_expiration,
        registration_secret=registration_secret(args),
        allowed_worker_networks=args.allowed_worker_networks,
        etcd=etcd_settings(args),
    )


# -- worker -----------------------------------------------------------------------------------------------------


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The model's engine and its settings; `serve` passes them on to every worker."""
    from lmfleet.engine.base import BatchSettings
    from lmfleet.engine.registry import AUTO, ENGINES
    from lmfleet.engine.transformers import DEVICES, DTYPES

    g = p.add_argument_group("engine")
    g.add_argument(
        "--engine",
        default=AUTO,
        choices=[AUTO, *ENGINES],
        help="auto (default): llamacpp for a .gguf, embedding for a sentence-transformers folder (modules.json), "
        "transformers for any other Hugging Face folder or hub id; embedding: serve an encoder's pooled vectors",
    )
    seqs = _default(BatchSettings, "max_num_seqs")
    g.add_argument(
        "--max-num-seqs", type=int, default=seqs, help=f"sequences decoded together in one batch (default {seqs})"
    )
    tokens = _default(BatchSettings, "max_batch_tokens")
    g.add_argument(
        "--max-batch-tokens", type=int, default=tokens, help=f"prompt tokens prefilled per step (default {tokens})"
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="cap on prompt + output tokens (default: the model's context; llama.cpp caps its KV cache at 8192)",
    )
    g.add_argument("--threads", type=int, default=None, help="llamacpp: CPU threads (default: every core)")
    g.add_argument(
        "--no-flash-attn",
        dest="flash_attn",
        action="store_false",
        help="llamacpp: plain attention (about 1.4x slower at 16 streams)",
    )
    g.add_argument("--device", default=None, choices=list(DEVICES), help="transformers: default cuda when available")
    g.add_argument("--dtype", default="auto", choices=list(DTYPES), help="transformers: default the checkpoint's")
    g.add_argument(
        "--matryoshka",
        action="store_true",
        help="embedding: allow `dimensions` (shorter vectors, renormalized) although the model's config does not "
        "say it was trained for them",
    )
    g.add_argument(
        "--tool-parser",
        default="auto",
        choices=["auto", "hermes", "llama3_json", "mistral"],  # lmfleet.worker.tools.FORMATS (not imported here)
        help="how the model writes tool calls (default auto: from its chat template; hermes for the generic prompt)",
    )


def add_worker_args(p: argparse.ArgumentParser) -> None:
    from lmfleet.worker.app import WorkerSettings

    _common(p, WORKER_PORT)
    p.add_argument(
        "--model-path",
        required=True,
        help="a .gguf file, a folder holding one, a Hugging Face model folder, or a hub id",
    )
    p.add_argument(
        "--model-names",
        type=_csv,
        default=None,
        help="comma-separated names to serve the model "
        "under (default: --model-path as given; its file or folder name is answered to as well)",
    )
    p.add_argument(
        "--worker-address",
        default=None,
        help="URL others reach this worker at (default http://HOST:PORT; set it when binding 0.0.0.0)",
    )
    p.add_argument(
        "--controller-address", type=_csv, default=[DEFAULT_CONTROLLER], help="controller URL(s), comma-separated"
    )
    p.add_argument("--no-register", action="store_true", help="do not register with a controller")
    _secret_flag(p)
    drain = _default(WorkerSettings, "drain_timeout_s")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=drain,
        help="on SIGTERM the worker leaves its "
        f"controllers and answers new requests 503; running ones get this many seconds (default {drain:g})",
    )
    add_engine_args(p)
    queued = _default(WorkerSettings, "max_queued")
    p.add_argument(
        "--limit-worker-concurrency",
        type=int,
        default=queued,
        help=f"requests running + queued before the worker answers 429 (default {queued})",
    )
    beat = _default(WorkerSettings, "heartbeat_interval_s")
    p.add_argument("--heartbeat-interval", type=float, default=beat, help=f"seconds (default {beat:g})")
    _fastchat_ignored(
        p,
        "--conv-template",
        "--num-gpus",
        "--gpus",
        "--max-gpu-memory",
        "--stream-interval",
        "--seed",
        "--load-8bit",
        "--cpu-offloading",
        "--embed-in-truncate",
        "--debug",
    )


def engine_settings(args: argparse.Namespace, engine: str) -> Any:  # the engine's settings dataclass
    from lmfleet.engine.registry import ENGINES

    values = {
        "max_num_seqs": args.max_num_seqs,
        "max_batch_tokens": args.max_batch_tokens,
        "max_model_len": args.max_model_len,
        "n_threads": args.threads,
        "flash_attn": args.flash_attn,
        "dtype": args.dtype,
        "device": args.device,
        "matryoshka": args.matryoshka,
    }
    cls = ENGINES[engine].settings
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def worker_settings(args: argparse.Namespace, **overrides: Any) -> Any:  # WorkerSettings
    """The worker's settings, the model located and its engine chosen first: a path that names nothing loadable
    is one line (SystemExit) before anything loads."""
    from lmfleet.engine import registry
    from lmfleet.worker.app import WorkerSettings

    try:
        source = registry.locate(args.model_path)
        entry = registry.choose(source, args.engine)
        engine = engine_settings(args, entry.name)
    except ValueError as exc:
        raise SystemExit(f"lmfleet worker: {exc}") from None
    fields: dict[str, Any] = dict(
        model_path=args.model_path,
        model_names=args.model_names,
        worker_address=args.worker_address or f"http://{args.host}:{args.port}",
        controller_addresses=[] if args.no_register else args.controller_address,
        engine=entry.name,
        engine_settings=engine,
        max_queued=args.limit_worker_concurrency,
        heartbeat_interval_s=args.heartbeat_interval,
        registration_secret=registration_secret(args),
        drain_timeout_s=args.drain_timeout,
        tool_parser=args.tool_parser,
    )
    fields.update(overrides)
    return WorkerSettings(**fields)


# -- API server -------------------------------------------------------------------------------------------------


def _limit_flags(p: argparse.ArgumentParser) -> None:
    """The API server's request limits (lmfleet.api.access.RequestLimits); each can only be lowered from its
    default, which is also the most the API accepts."""
    from lmfleet.api.access import RequestLimits
    from lmfleet.api.app import ApiSettings

    d = RequestLimits()
    g = p.add_argument_group("request limits (each over-limit request is a 4xx naming the parameter)")
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=_default(ApiSettings, "max_request_bytes"),
        help="request body size (413 beyond)",
    )
    g.add_argument("--max-n", type=int, default=d.max_n, help="choices per request (`n`)")
    g.add_argument("--max-stop", type=int, default=d.max_stop, help="stop sequences per request")
    g.add_argument("--max-stop-chars", type=int, default=d.max_stop_chars, help="characters per stop sequence")
    g.add_argument("--max-messages", type=int, default=d.max_messages, help="messages per chat request")
    g.add_argument(
        "--max-message-chars",
        type=int,
        default=d.max_message_chars,
        help="characters in one message's content or one prompt",
    )


def add_api_args(p: argparse.ArgumentParser) -> None:
    from lmfleet.api.app import ApiSettings
    from lmfleet.dispatch import DEFAULT_POLICY, POLICIES

    _common(p, API_PORT)
    _fastchat_ignored(p, "--allow-credentials", "--allowed-methods", "--allowed-headers")
    p.add_argument(
        "--controller-address",
        default=DEFAULT_CONTROLLER,
        help="controller URL(s), comma-separated; "
        "the first that answers gives the list of workers, which is kept while none answers",
    )
    _secret_flag(p)
    p.add_argument(
        "--dispatch-method",
        default=DEFAULT_POLICY,
        choices=sorted(POLICIES),
        help="how a worker is picked from the API server's view",
    )
    drain = _default(ApiSettings, "drain_timeout_s")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=drain,
        help="on SIGTERM the server answers new "
        f"requests 503; running ones get this many seconds to finish (default {drain:g})",
    )
    add_api_client_args(p)


def add_api_client_args(p: argparse.ArgumentParser) -> None:
    """What the API server offers its clients; `serve` passes these on to its API server."""
    from lmfleet.api.app import ApiSettings

    _limit_flags(p)
    first = _default(ApiSettings, "first_token_timeout_s")
    p.add_argument(
        "--first-token-timeout",
        type=float,
        default=first,
        help="seconds a worker may take to send "
        f"its first chunk (queue + prefill) before the request moves to another worker (default {first:g})",
    )
    inter = _default(ApiSettings, "inter_token_timeout_s")
    p.add_argument(
        "--inter-token-timeout",
        type=float,
        default=inter,
        help="seconds a worker may stay silent "
        f"mid-stream before the generation is resumed on another worker (default {inter:g})",
    )
    p.add_argument(
        "--api-keys",
        default=None,
        help="comma-separated keys clients must send as Bearer tokens "
        "(also $LMFLEET_API_KEYS; prefer --api-key-file to keep keys out of `ps`)",
    )
    p.add_argument("--api-key-file", default=None, help="file with one API key per line")
    p.add_argument(
        "--metrics-public",
        action="store_true",
        help="serve GET /metrics without an API key (for a Prometheus scraper that holds none)",
    )
    p.add_argument("--default-model", default=None, help="model used when a request names none")
    p.add_argument(
        "--responses-db",
        default=None,
        metavar="PATH",
        help="SQLite file keeping stored responses (/v1/responses `store`, `previous_response_id`) across restarts "
        "(default: a temporary database, deleted when the API server exits)",
    )
    p.add_argument(
        "--no-responses-store",
        action="store_true",
        help="store no responses: `previous_response_id` is a 400, GET /v1/responses/{id} a 404",
    )
    p.add_argument(
        "--allowed-origins",
        "--allow-origins",
        dest="allowed_origins",
        type=_csv,
        default=None,
        help="CORS origins, comma-separated (default: CORS off)",
    )


def api_settings(args: argparse.Namespace) -> Any:  # ApiSettings
    from lmfleet.api.access import RequestLimits
    from lmfleet.api.app import ApiSettings
    from lmfleet.api.response_store import TEMPORARY

    try:
        limits = RequestLimits(
            max_n=args.max_n,
            max_stop=args.max_stop,
            max_stop_chars=args.max_stop_chars,
            max_messages=args.max_messages,
            max_message_chars=args.max_message_chars,
        )
        return ApiSettings(
            controller_address=args.controller_address,
            api_keys=api_keys(args),
            default_model=args.default_model,
            allow_origins=args.allowed_origins,
            registration_secret=registration_secret(args),
            max_request_bytes=args.max_request_bytes,
            limits=limits,
            dispatch_policy=args.dispatch_method,
            first_token_timeout_s=args.first_token_timeout,
            inter_token_timeout_s=args.inter_token_timeout,
            drain_timeout_s=args.drain_timeout,
            responses_db=None if args.no_responses_store else (args.responses_db or TEMPORARY),
            metrics_public=args.metrics_public,
        )
    except ValueError as exc:
        raise SystemExit(f"lmfleet api: {exc}") from None


# -- serve ------------------------------------------------------------------------------------------------------

# Flags `serve` hands to every worker and to its API server, as (flag, args attribute).
_ENGINE_FLAGS = (
    ("--engine", "engine"),
    ("--max-num-seqs", "max_num_seqs"),
    ("--max-batch-tokens", "max_batch_tokens"),
    ("--max-model-len", "max_model_len"),
    ("--threads", "threads"),
    ("--device", "device"),
    ("--dtype", "dtype"),
    ("--tool-parser", "tool_parser"),
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
    ("--default-model", "default_model"),
    ("--responses-db", "responses_db"),
)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from lmfleet.dispatch import DEFAULT_POLICY, POLICIES
    from lmfleet.models import DEFAULT_MODEL, DEMO_MODEL_NAME

    p.add_argument("--host", default="127.0.0.1", help="address the API server binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=API_PORT, help="API server port")
    _log_args(p)
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
    p.add_argument("--controller-port", type=int, default=CONTROLLER_PORT)
    p.add_argument("--worker-port", type=int, default=WORKER_PORT, help="first worker's port; the next ones count up")
    p.add_argument("--dispatch-method", default=DEFAULT_POLICY, choices=sorted(POLICIES))
    add_engine_args(p)
    p.add_argument("--limit-worker-concurrency", type=int, default=None)
    p.add_argument("--heartbeat-interval", type=float, default=None)
    add_api_client_args(p)


def _flags(args: argparse.Namespace, pairs: Sequence[tuple[str, str]]) -> list[str]:
    return [s for flag, name in pairs if getattr(args, name) is not None for s in (flag, str(getattr(args, name)))]


def serve_plan(args: argparse.Namespace) -> Any:  # lmfleet.serve.ServePlan
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
        if model_names:
            cmd += ["--model-names", model_names]
        served.update(_csv(model_names) if model_names else [path])
        children.append(Child(f"worker {i + 1}", cmd))
    api = py + ["lmfleet.api", "--host", args.host, "--port", str(args.port), "--controller-address", controller]
    if args.allowed_origins:
        api += ["--allowed-origins", ",".join(args.allowed_origins)]
    if args.no_responses_store:
        api.append("--no-responses-store")
    if args.metrics_public:
        api.append("--metrics-public")
    children.append(Child("api", api + _flags(args, _API_FLAGS) + log))
    env = {"LMFLEET_REGISTRATION_SECRET": os.environ.get("LMFLEET_REGISTRATION_SECRET") or secrets.token_urlsafe(24)}
    keys = api_keys(args)
    if keys:
        env["LMFLEET_API_KEYS"] = ",".join(keys)  # through the environment, not argv: keys stay out of `ps`
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    return ServePlan(
        children, api_url=f"http://{host}:{args.port}", models=served, env=env, api_key=keys[0] if keys else None
    )


# -- running ----------------------------------------------------------------------------------------------------


def _logs(args: argparse.Namespace) -> dict[str, Any]:
    return {"log_level": args.log_level, "log_format": args.log_format}


def run_controller(args: argparse.Namespace) -> int:
    from lmfleet import server
    from lmfleet.controller.app import create_app

    settings = controller_settings(args)
    sock = server.bind("controller", args.host, args.port)
    return server.run(create_app(settings), name="controller", sock=sock, **_logs(args))


def run_worker(args: argparse.Namespace) -> int:
    from lmfleet import server
    from lmfleet.drain import Drain
    from lmfleet.worker.app import create_app

    settings = worker_settings(args)
    sock = server.bind("worker", args.host, args.port)
    drain = Drain(settings.drain_timeout_s)
    app = create_app(settings, drain=drain)
    return server.run(app, name="worker", sock=sock, drain=drain, **_logs(args))


def run_api(args: argparse.Namespace) -> int:
    from lmfleet import server
    from lmfleet.api.app import create_app
    from lmfleet.drain import Drain

    settings = api_settings(args)
    sock = server.bind("api", args.host, args.port)
    drain = Drain(settings.drain_timeout_s)
    return server.run(create_app(settings, drain=drain), name="api", sock=sock, drain=drain, **_logs(args))


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
    parser = argparse.ArgumentParser(prog="lmfleet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_controller_args(sub.add_parser("controller", help=f"run the controller (default :{CONTROLLER_PORT})"))
    add_worker_args(sub.add_parser("worker", help=f"run a model worker (default :{WORKER_PORT})"))
    add_api_args(sub.add_parser("api", help=f"run the OpenAI-compatible API server (default :{API_PORT})"))
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
    warn_ignored(args)
    return RUNNERS[args.command](args)


def module_main(command: str) -> None:
    """`python -m lmfleet.<command>`."""
    raise SystemExit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    raise SystemExit(main())
