"""Running one app as a process: the socket, uvicorn, the logs, and the drain on SIGTERM.

Logs: `configure_logging(level, fmt)` sets up every logger of the process (lmfleet's, uvicorn's, the libraries'),
as text (default) or as one JSON object per line (`--log-format json`, for log shippers), each line carrying the
`X-Request-ID` of the request it is about (lmfleet.requestid).

Owns `run(app, ...)`: binds the listening socket before anything loads (so a busy port is the first and last
line a user sees, naming the process and the port, not a traceback after a minute of model loading), serves the
app with uvicorn, and on the first SIGTERM or SIGINT awaits the app's `Drain` (the app refuses new requests and
lets running ones finish) before uvicorn's graceful shutdown; a second signal skips the rest of it. The access log
never shows a query string (a client may put a key there) and keeps the fleet's own polling (workers listing,
heartbeats, health and readiness probes) at debug level.

Does not own: flags (lmfleet.cli, each part's flags module), the apps.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import socket
from typing import Any

import uvicorn

from lmfleet.drain import Drain
from lmfleet.requestid import RequestIdFilter

logger = logging.getLogger("lmfleet")

# Paths the fleet, the web page's dashboard and a Prometheus scraper poll every second or so (an API server over
# FastChat's controller: its model list, a worker per model, each worker's status): an access line for each drowns
# the log.
QUIET_PATHS = frozenset(
    {
        "/workers",
        "/receive_heart_beat",
        "/health",
        "/ready",
        "/worker/status",
        "/v1/fleet",
        "/metrics",
        "/list_models",
        "/get_worker_address",
        "/worker_get_status",
    }
)


class AccessLogFilter(logging.Filter):
    """uvicorn's access record args: (client, method, path with query, http version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not (isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str)):
            return True
        path, _, query = args[2].partition("?")
        if path in QUIET_PATHS and isinstance(args[4], int) and args[4] < 400:
            return logger.isEnabledFor(logging.DEBUG)
        if query:
            record.args = (*args[:2], path + "?[query removed]", *args[3:])
        return True


LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s"  # plus exc_info when there is one


def log_config(level: str = "info", fmt: str = "text") -> dict[str, Any]:
    """One `logging.config.dictConfig` for the whole process, uvicorn's loggers included (uvicorn applies it too)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    formatter: dict[str, Any] = (
        {"()": "pythonjsonlogger.json.JsonFormatter", "fmt": JSON_FIELDS, "rename_fields": {"levelname": "level"}}
        if fmt == "json"
        else {"format": TEXT_FORMAT}
    )

    def handler(stream: str, *filters: str) -> dict[str, Any]:
        return {"class": "logging.StreamHandler", "stream": stream, "formatter": "lmfleet", "filters": list(filters)}

    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}, "access": {"()": AccessLogFilter}},
        "formatters": {"lmfleet": formatter},
        "handlers": {
            "default": handler("ext://sys.stderr", "request_id"),
            "access": handler("ext://sys.stdout", "request_id", "access"),
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["access"], "level": level, "propagate": False},
            "httpx": {"level": "WARNING"},  # one INFO line per internal request drowns the log
        },
        "root": {"handlers": ["default"], "level": level},
    }


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    logging.config.dictConfig(log_config(level, fmt))


def bind(name: str, host: str, port: int) -> socket.socket:
    """The listening socket, or SystemExit with one line naming the process, the address and why."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"lmfleet {name}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def run(
    app: Any,
    *,
    name: str,
    sock: socket.socket,
    log_level: str = "info",
    log_format: str = "text",
    drain: Drain | None = None,
) -> int:
    """Serve `app` on `sock` (from `bind`) until a signal; 0 on a clean stop, 3 when uvicorn could not start."""

    class Server(uvicorn.Server):
        _loop: asyncio.AbstractEventLoop | None = None
        _drain_task: asyncio.Future[None] | None = None

        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:  # a signal handler, on the loop's thread
            if drain is None or self._loop is None or self._drain_task is not None or self.should_exit:
                super().handle_exit(sig, frame)
                return
            self._loop.call_soon_threadsafe(self._start_drain, sig)

        def _start_drain(self, sig: int) -> None:
            if self._drain_task is None:
                self._drain_task = asyncio.ensure_future(self._drain_then_exit(sig))

        async def _drain_then_exit(self, sig: int) -> None:
            assert drain is not None
            try:
                await drain.drain()
            except Exception:
                logger.exception("drain failed")
            super().handle_exit(sig, None)

    config = uvicorn.Config(
        app,
        log_level=log_level,
        log_config=log_config(log_level, log_format),
        timeout_graceful_shutdown=10 if drain is None else 2,
    )
    server = Server(config)
    server.run(sockets=[sock])
    if not server.started:
        logger.error("lmfleet %s did not start (see above)", name)
        return 3  # uvicorn's STARTUP_FAILURE
    return 0
