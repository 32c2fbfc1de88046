"""`lmfleet controller`'s flags into its settings: the registry in memory by default, in etcd with --registry."""

from __future__ import annotations

import argparse

import pytest

from lmfleet.controller import flags as controller_flags
from lmfleet.controller.app import ControllerSettings


def test_controller_registry_flags(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    def settings(*flags: str) -> ControllerSettings:
        parser = argparse.ArgumentParser()
        controller_flags.add_args(parser)
        return controller_flags.settings(parser.parse_args(list(flags)))

    assert settings().etcd is None  # the in-memory registry by default
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    monkeypatch.setenv("LMFLEET_ETCD_PASSWORD", "from-the-environment")
    etcd = settings(
        "--registry", "etcd://10.0.0.1,10.0.0.2:12379", "--etcd-user", "lmfleet", "--etcd-prefix", "/f/",
        "--etcd-ca-file", str(ca),
    ).etcd  # fmt: skip
    assert etcd.endpoints == [("10.0.0.1", 2379), ("10.0.0.2", 12379)] and etcd.prefix == "/f/"
    assert (etcd.user, etcd.password, etcd.tls) == ("lmfleet", "from-the-environment", True)
    for bad in (
        ["--registry", "etcd://user:pw@h"],
        ["--registry", "redis://h"],
        ["--registry", "etcd://h", "--etcd-key-file", str(ca)],
    ):
        with pytest.raises(SystemExit, match="lmfleet controller: "):
            settings(*bad)
