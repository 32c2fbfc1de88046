"""The programs the suite starts beside lmfleet (etcd, etcdctl, openssl, Chromium, ip), found one way.

`program(name)` is the only way a test finds one: the name must stand in scripts/install_system_packages.sh's table
(the script `make test` runs), or the test fails at once; a program that is declared but missing fails the test in CI
(a broken install step) and skips it elsewhere. tests/test_install.py checks statically that every program a test
names is in that table.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from pathlib import Path

import pytest

INSTALL_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install_system_packages.sh"


@functools.cache
def declared() -> dict[str, str]:
    """program -> the Debian package that ships it, as the install script's PROGRAMS table says."""
    table = re.search(r"^PROGRAMS=\(([^)]*)\)", INSTALL_SCRIPT.read_text(), re.MULTILINE)
    if table is None:
        raise RuntimeError(f"{INSTALL_SCRIPT} has no PROGRAMS=(program:package ...) table")
    return dict(entry.split(":", 1) for entry in table.group(1).split())


def program(name: str, path: str | None = None) -> str:
    """The path of `name` (or of `path`, an override such as $LMFLEET_CHROMIUM, which stands for `name`)."""
    package = declared().get(name)
    if package is None:
        raise RuntimeError(f"{name} is not in {INSTALL_SCRIPT.name}'s PROGRAMS table: a fresh machine lacks it")
    found = shutil.which(path or name)
    if found is None:
        message = f"{path or name} is not installed (scripts/install_system_packages.sh installs the package {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found
