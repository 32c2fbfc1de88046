"""`pip install lmfleet` with no extra: the command line, the API server and the controller work; a worker whose
engine's extra is missing says in one line which extra to install.

No second virtualenv: each check runs `lmfleet` in a fresh interpreter whose import system refuses the extras'
libraries, as an interpreter without them would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import Proc, free_port, wait_until

# The libraries only an extra installs (pyproject.toml: llamacpp, transformers, etcd), as imported.
EXTRAS = (
    "llguidance",
    "numpy",
    "llama_cpp",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "psutil",
    "gguf",
    "accelerate",
    "aetcd",
    "grpc",
)

# `python -c BLOCK... BLOCKED`: an interpreter where importing a BLOCKED (comma-separated) module fails as it does
# when the module is not installed.
BLOCK = """
import sys

blocked = set(sys.argv[1].split(","))


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
"""
LMFLEET = BLOCK + "from lmfleet.cli import main\nraise SystemExit(main(sys.argv[2:]))\n"


def lmfleet_cmd(*args: str, blocked: tuple[str, ...] = EXTRAS) -> list[str]:
    """`lmfleet ARGS...` without the `blocked` libraries."""
    return [sys.executable, "-c", LMFLEET, ",".join(blocked), *args]


def run_lmfleet(*args: str, blocked: tuple[str, ...] = EXTRAS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lmfleet_cmd(*args, blocked=blocked), capture_output=True, text=True, timeout=120)


def test_a_blocked_library_cannot_be_imported() -> None:
    """Else every test here would pass on a machine with the extras for the wrong reason."""
    code = BLOCK + "import llguidance"
    out = subprocess.run([sys.executable, "-c", code, "llguidance"], capture_output=True, text=True, timeout=60)
    assert "ModuleNotFoundError: No module named 'llguidance'" in out.stderr


@pytest.mark.parametrize("command", [[], ["controller"], ["api"], ["worker"], ["serve"]])
def test_help_needs_no_extra(command: list[str]) -> None:
    out = run_lmfleet(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: lmfleet" in out.stdout and not out.stderr


@pytest.mark.parametrize(
    ("model", "blocked", "expected"),
    [
        ("m.gguf", EXTRAS, "the llamacpp engine needs the 'llama_cpp' package: pip install 'lmfleet[llamacpp]'"),
        ("hf", EXTRAS, "the transformers engine needs the 'torch' package: pip install 'lmfleet[transformers]'"),
        # llama-cpp-python installed by hand, without the extra: the grammar library is missing
        (
            "m.gguf",
            ("llguidance",),
            "the llamacpp engine needs the 'llguidance' package: pip install 'lmfleet[llamacpp]'",
        ),
    ],
)
def test_a_worker_without_its_engines_extra_names_the_extra(
    tmp_path: Path, model: str, blocked: tuple[str, ...], expected: str
) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    out = run_lmfleet("worker", "--model-path", str(tmp_path / model), "--port", str(free_port()), blocked=blocked)
    assert out.returncode != 0
    assert out.stderr == f"lmfleet worker: {expected}\n"


@pytest.mark.parametrize("part", ["controller", "api"])
def test_the_controller_and_the_api_server_run_without_any_extra(tmp_path: Path, part: str) -> None:
    port = free_port()
    proc = Proc(part, lmfleet_cmd(part, "--port", str(port)), tmp_path / f"{part}.log").start()
    try:
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200,
            timeout=60,
            procs=[proc],
            what=f"{part} /health",
        )
    finally:
        proc.stop()
    assert "Traceback" not in (tmp_path / f"{part}.log").read_text()
