"""Running one app as a process: the socket, uvicorn, the logs, and the drain on SIGTERM.

Owns `run(app, ...)`: binds the listening socket before anything loads (so a busy port is the first and last
line a user sees, naming the process and the port, not a traceback after a minute of model loading), serves the
app with uvicorn, and on the first SIGTERM or SIGINT awaits the app's `Drain` (the app refuses new requests and
lets running ones finish) before uvicorn's graceful shutdown; a second signal skips the rest of it. The access log
never shows a query string (a client may put a key there) and keeps the fleet's own polling (workers listing,
heartbeats, health and readiness probes) at debug level.

Does not own: flags (lmfleet.cli), the apps.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import socket
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from lmfleet.drain import Drain

logger = logging.getLogger("lmfleet")

# Paths the fleet (and a Prometheus scraper) polls every few seconds: an access line for each drowns the log.
QUIET_PATHS = frozenset({"/workers", "/receive_heart_beat", "/health", "/ready", "/worker/status", "/metrics"})


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


def log_config() -> dict[str, Any]:
    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["access"] = {"()": AccessLogFilter}
    config["handlers"]["access"]["filters"] = ["access"]
    return config


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


def run(app: Any, *, name: str, sock: socket.socket, log_level: str = "info", drain: Drain | None = None) -> int:
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
        log_config=log_config(),
        timeout_graceful_shutdown=10 if drain is None else 2,
    )
    server = Server(config)
    server.run(sockets=[sock])
    if not server.started:
        logger.error("lmfleet %s did not start (see above)", name)
        return 3  # uvicorn's STARTUP_FAILURE
    return 0
