"""Every program a test starts is installed by the repo's own scripts: a fresh machine (CI's, a newcomer's) runs the
whole suite, not only the machine it was written on. The check reads the tests' source, so it holds for tests that
were skipped or not run here."""

from __future__ import annotations

import ast
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.programs import declared

TESTS = Path(__file__).resolve().parent
SUBPROCESS = {"run", "Popen", "check_call", "check_output", "call", "create_subprocess_exec"}


def named_programs(tree: ast.AST) -> set[str]:
    """Programs a test module names: `program(NAME)`, `shutil.which(NAME)`, a subprocess call whose command starts
    with a literal, and literal paths under /usr/bin or /usr/sbin."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = re.fullmatch(r"/usr/(?:local/)?s?bin/([\w.+-]+)", node.value)
            if m:
                found.add(m.group(1))
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func, first = node.func, node.args[0]
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        module = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        if name in ("program", "which") and isinstance(first, ast.Constant) and isinstance(first.value, str):
            found.add(first.value)
        elif module in ("subprocess", "asyncio") and name in SUBPROCESS:
            head = first.elts[0] if isinstance(first, (ast.List, ast.Tuple)) and first.elts else first
            if isinstance(head, ast.Constant) and isinstance(head.value, str) and not head.value.startswith("-"):
                found.add(Path(head.value).name)
    return found


def test_every_program_a_test_names_is_installed_by_the_install_script() -> None:
    named: dict[str, set[str]] = {}
    for path in TESTS.rglob("*.py"):
        for prog in named_programs(ast.parse(path.read_text(), str(path))):
            named.setdefault(prog, set()).add(str(path.relative_to(TESTS.parent)))
    missing = {prog: sorted(where) for prog, where in named.items() if prog not in declared()}
    assert not missing, f"programs the tests start that scripts/install_system_packages.sh does not install: {missing}"
    assert {"etcd", "etcdctl", "ip", "chromium", "openssl"} <= named.keys()  # the scan still sees the calls


def test_the_scan_sees_each_way_a_test_starts_a_program() -> None:
    source = """
import shutil, subprocess
subprocess.run(["etcdctl", "get"]); subprocess.Popen(("tc", "qdisc")); shutil.which("openssl")
program("chromium"); EXE = "/usr/sbin/" + "ip"; ETCD = "/usr/bin/etcd"; subprocess.run(cmd); run("req")
"""
    assert named_programs(ast.parse(source)) == {"etcdctl", "tc", "openssl", "chromium", "etcd"}


@pytest.mark.skipif(not os.environ.get("CI"), reason="after `make test` installed them (CI)")
def test_the_install_script_installed_every_program_it_declares() -> None:
    assert [prog for prog in declared() if shutil.which(prog) is None] == []
