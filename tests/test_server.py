"""Running a part as a process (lmfleet.server): a busy port is one clear line at once, and the access log keeps
the fleet's own polling out and every query string hidden."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys

import pytest

from lmfleet import server
from tests.conftest import free_port


def test_a_busy_port_is_one_line_naming_the_process_and_the_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"lmfleet api: cannot listen on 127.0.0.1:{port}"):
            server.bind("api", "127.0.0.1", port)
        done = subprocess.run(
            [sys.executable, "-m", "lmfleet.controller", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith(f"lmfleet controller: cannot listen on 127.0.0.1:{port}")
    server.bind("api", "127.0.0.1", free_port()).close()


def access(path: str, status: int = 200) -> logging.LogRecord:
    return logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        "",
        0,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", path, "1.1", status),
        None,
    )


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
def test_the_access_log_hides_polling_and_query_strings(level: int) -> None:
    log_filter = server.AccessLogFilter()
    previous = server.logger.level
    server.logger.setLevel(level)
    try:
        assert log_filter.filter(access("/workers")) is (level == logging.DEBUG)  # once a second per API server
        assert log_filter.filter(access("/workers", 500))  # a failure always shows
        record = access("/v1/models?api_key=sk-secret")
        assert log_filter.filter(record) and "sk-secret" not in record.getMessage()
        assert log_filter.filter(access("/v1/chat/completions"))
    finally:
        server.logger.setLevel(previous)
