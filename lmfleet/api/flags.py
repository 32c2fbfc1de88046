"""`lmfleet api`'s flags, and the `ApiSettings` they make (lmfleet.api.app).

Owns the API server's flags (`add_args`; FastChat's names kept, its CORS switches accepted and ignored), the subset
`lmfleet serve` passes on to its API server (`add_client_args`: request limits, timeouts, keys, CORS, metrics,
default model, stored responses) and turning them into the settings (`settings`). Each default is read from the
settings it belongs to (`ApiSettings`, `RequestLimits`); a limit can only be lowered from its default, which is also
the most the API accepts.

Does not own: the flags every part shares (lmfleet.flags), the settings themselves and their validation
(lmfleet.api.app, lmfleet.api.access), running the process (lmfleet.cli).
"""

from __future__ import annotations

import argparse

from lmfleet import flags
from lmfleet.api.access import RequestLimits
from lmfleet.api.app import ApiSettings
from lmfleet.api.response_store import TEMPORARY
from lmfleet.client import DEFAULT_CONTROLLER
from lmfleet.dispatch import DEFAULT_POLICY, POLICIES

PORT = 8000  # FastChat's API server port


def add_args(p: argparse.ArgumentParser) -> None:
    flags.add_listen_args(p, PORT)
    flags.add_fastchat_ignored(p, "--allow-credentials", "--allowed-methods", "--allowed-headers")
    p.add_argument(
        "--controller-address",
        default=DEFAULT_CONTROLLER,
        help="controller URL(s), comma-separated; "
        "the first that answers gives the list of workers, which is kept while none answers",
    )
    flags.add_secret_arg(p)
    p.add_argument(
        "--dispatch-method",
        default=DEFAULT_POLICY,
        choices=sorted(POLICIES),
        help="how a worker is picked from the API server's view",
    )
    p.add_argument(
        "--expect-models",
        type=flags.csv,
        default=[],
        help="comma-separated models this server answers 503 (starting, retry) rather than 404 until a worker "
        "serves them (`lmfleet serve` passes its plan's models)",
    )
    drain = ApiSettings().drain_timeout_s
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=drain,
        help="on SIGTERM the server answers new "
        f"requests 503; running ones get this many seconds to finish (default {drain:g})",
    )
    add_client_args(p)


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    """The request limits (lmfleet.api.access.RequestLimits) and the body size."""
    d = RequestLimits()
    g = p.add_argument_group("request limits (each over-limit request is a 4xx naming the parameter)")
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=ApiSettings().max_request_bytes,
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


def add_client_args(p: argparse.ArgumentParser) -> None:
    """What the API server offers its clients; `serve` passes these on to its API server."""
    defaults = ApiSettings()
    _add_limit_args(p)
    first = defaults.first_token_timeout_s
    p.add_argument(
        "--first-token-timeout",
        type=float,
        default=first,
        help="seconds a worker may take to send "
        f"its first chunk (queue + prefill) before the request moves to another worker (default {first:g})",
    )
    inter = defaults.inter_token_timeout_s
    p.add_argument(
        "--inter-token-timeout",
        type=float,
        default=inter,
        help="seconds a worker may stay silent "
        f"mid-stream before the generation is resumed on another worker (default {inter:g})",
    )
    load = defaults.model_load_timeout_s
    p.add_argument(
        "--model-load-timeout",
        type=float,
        default=load,
        help="seconds more a worker that loads models on demand may take before its first chunk when it loads the "
        f"model first (default {load:g})",
    )
    p.add_argument(
        "--api-keys",
        default=None,
        help="comma-separated keys clients must send as Bearer tokens "
        "(also $LMFLEET_API_KEYS; prefer --api-key-file to keep keys out of `ps`)",
    )
    p.add_argument("--api-key-file", default=None, help="file with one API key per line")
    p.add_argument(
        "--admin-keys",
        default=None,
        help="comma-separated keys for the admin routes (/admin/models/load, unload, pin), which then take no "
        "API key (also $LMFLEET_ADMIN_KEYS; default: an API key will do)",
    )
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
        type=flags.csv,
        default=None,
        help="CORS origins, comma-separated (default: CORS off)",
    )


def settings(args: argparse.Namespace) -> ApiSettings:
    """The API server's settings; SystemExit, one line, for values they refuse (a limit above its default)."""
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
            api_keys=flags.api_keys(args),
            default_model=args.default_model,
            allow_origins=args.allowed_origins,
            registration_secret=flags.registration_secret(args),
            max_request_bytes=args.max_request_bytes,
            limits=limits,
            dispatch_policy=args.dispatch_method,
            first_token_timeout_s=args.first_token_timeout,
            inter_token_timeout_s=args.inter_token_timeout,
            model_load_timeout_s=args.model_load_timeout,
            drain_timeout_s=args.drain_timeout,
            responses_db=None if args.no_responses_store else (args.responses_db or TEMPORARY),
            metrics_public=args.metrics_public,
            admin_keys=flags.admin_keys(args),
            expected_models=args.expect_models,
        )
    except ValueError as exc:
        raise SystemExit(f"lmfleet api: {exc}") from None
