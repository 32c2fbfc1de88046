"""`lmfleet chat` in a pseudo-terminal against the real fleet: the reply streams, /model switches, Ctrl-C stops a
long generation on the worker and the program carries on, Ctrl-C twice or Ctrl-D quits."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import Fleet, wait_until

from .conftest import worker_running

pytestmark = pytest.mark.timeout(300)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


def _as_a_background_job() -> None:
    """The child's start: the pty is its controlling terminal (^C there is a SIGINT, as for a user), and SIGINT is
    ignored, as in a job a non-interactive shell started with `&` (CI runners do): the program must still stop on
    Ctrl-C."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Pty:
    """A program on a pseudo-terminal of its own (its controlling terminal: ^C is a SIGINT, as for a user)."""

    def __init__(self, *cmd: str) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.proc = subprocess.Popen(
            cmd,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=_as_a_background_job,
            env={**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"},
        )
        os.close(slave)
        self.output = ""
        self.seen = 0  # how much of `output` the expectations have consumed
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.output += ANSI.sub("", data.decode(errors="replace"))

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """Wait for `pattern` in the output not yet consumed; consume up to the end of the match."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                match = re.compile(pattern).search(self.output, self.seen)
                if match:
                    self.seen = match.end()
                    return match
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the terminal:\n{self.output[self.seen :]!r}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


@pytest.fixture
def chat(stack: Fleet) -> Iterator[Pty]:
    term = Pty(sys.executable, "-m", "lmfleet", "chat", "--base-url", stack.api_url + "/v1", "--model", "tiny",
               "--temperature", "0")  # fmt: skip
    yield term
    term.close()


def test_chat_streams_switches_models_and_survives_ctrl_c(chat: Pty, stack: Fleet) -> None:
    chat.expect(r"model tiny")
    chat.expect(r"> ")
    chat.send("/model\n")
    chat.expect(r"models: smollm2, \[tiny\]")
    chat.send("/model nope\n")
    chat.expect(r"no model 'nope' here")
    chat.send("/model smollm2\n")
    chat.expect(r"\(model: smollm2\)")
    chat.send("/system You are a helpful assistant.\n")
    chat.expect(r"\(system prompt: You are a helpful assistant.\)\n> ")

    chat.send("What is the capital of France?\n")
    chat.expect(r"Paris.*\n> ", timeout=120)

    # A long answer: it shows while the worker is still generating; Ctrl-C stops it there and then.
    chat.send("Write a long essay on the history of the Roman Empire.\n")
    chat.expect(r"Empire\.\n(\S+\s+){10}", timeout=120)  # ten words of the reply are on the screen...
    assert worker_running(stack.smol_port) == 1  # ...and the worker is still at it
    chat.send("\x03")
    chat.expect(r"\[stopped\]\n> ")
    wait_until(lambda: worker_running(stack.smol_port) == 0, timeout=30, what="the worker to stop generating")

    # The program carries on, with the conversation (the cut answer included) until /clear.
    chat.send("/clear\n")
    chat.expect(r"conversation cleared")
    chat.send('"""\nWhat is the capital\nof France?\n"""\n')  # a multi-line message
    chat.expect(r"Paris.*\n> ", timeout=120)

    chat.send("\x03")
    chat.expect(r"Ctrl-C again or Ctrl-D to quit")
    chat.send("\x03")
    assert chat.proc.wait(timeout=30) == 0


def test_ctrl_d_quits(chat: Pty) -> None:
    chat.expect(r"> ")
    chat.send("\x04")
    assert chat.proc.wait(timeout=30) == 0


def test_an_endpoint_that_is_not_there_is_one_line(stack: Fleet) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lmfleet", "chat", "--base-url", "http://127.0.0.1:9/v1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("lmfleet chat: cannot list the models at http://127.0.0.1:9/v1/")
    assert "Traceback" not in done.stderr
