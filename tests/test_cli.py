"""FastChat users' command lines start lmfleet unchanged."""

from __future__ import annotations

import logging

import pytest

from lmfleet import cli


def test_fastchat_worker_command_line_parses_with_the_same_meaning() -> None:
    args = cli.build_parser().parse_args([
        "worker", "--host", "127.0.0.1", "--port", "21003", "--worker-address", "http://127.0.0.1:21003",
        "--controller-address", "http://127.0.0.1:21001", "--model-path", "/models/vicuna", "--model-names",
        "vicuna-7b,gpt-3.5-turbo", "--device", "cpu", "--num-gpus", "1", "--conv-template", "vicuna_v1.1",
        "--limit-worker-concurrency", "5", "--stream-interval", "2", "--load-8bit",
    ])
    settings = cli.worker_settings(args)
    assert settings.model_names == ["vicuna-7b", "gpt-3.5-turbo"]
    assert settings.max_queued == 5 and settings.worker_address == "http://127.0.0.1:21003"
    assert settings.controller_addresses == ["http://127.0.0.1:21001"]


def test_ignored_fastchat_flags_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    args = cli.build_parser().parse_args(["worker", "--model-path", "m", "--conv-template", "x", "--load-8bit"])
    with caplog.at_level(logging.WARNING, logger="lmfleet"):
        cli.warn_ignored(args)
    assert "--conv-template" in caplog.text and "--load-8bit" in caplog.text
    assert "--num-gpus" not in caplog.text  # not given, not reported


def test_fastchat_api_and_controller_command_lines_parse() -> None:
    api = cli.build_parser().parse_args([
        "api", "--host", "127.0.0.1", "--port", "8000", "--controller-address", "http://127.0.0.1:21001",
        "--allow-credentials", "--allowed-origins", "http://a.example", "--api-keys", "k1,k2",
    ])
    assert api.allowed_origins == ["http://a.example"] and cli._api_keys(api) == ["k1", "k2"]
    ctl = cli.build_parser().parse_args(["controller", "--dispatch-method", "lottery"])
    assert ctl.dispatch_method == "lottery" and ctl.host == "127.0.0.1"


def test_tls_is_not_silently_ignored() -> None:
    with pytest.raises(SystemExit):  # FastChat's --ssl would mean TLS; lmfleet expects a terminator in front
        cli.build_parser().parse_args(["api", "--ssl"])


def test_serve_waits_for_model_names_not_a_count_of_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two replicas of one model register one name: `serve` must not wait for a second name that never comes."""
    from lmfleet import serve

    parse = cli.build_parser().parse_args
    named = parse(["serve", "--model-path", "/m/a", "--model-names", "x,y", "--model-path", "/m/b"])
    assert serve.served_names(serve.plan(named)) == {"x", "y", "/m/b"}
    replicas = parse(["serve", "--model-path", "/m/a", "--model-path", "/m/a"])
    expected = serve.served_names(serve.plan(replicas))
    assert expected == {"/m/a"}

    class Listing:
        def json(self) -> dict:
            return {"data": [{"id": "/m/a"}]}

    class Alive:
        def poll(self) -> None:
            return None

    monkeypatch.setattr(serve.httpx, "get", lambda *a, **k: Listing())
    procs = [Alive() for _ in range(4)]  # controller, two workers, API server
    assert serve._wait_ready("http://api", procs, None, lambda: False, expected, timeout_s=5) == ["/m/a"]


def test_serve_forwards_the_api_limits_and_timeouts() -> None:
    from lmfleet import serve

    args = cli.build_parser().parse_args(["serve", "--model-path", "m", "--max-n", "4", "--inter-token-timeout", "5"])
    api = serve.plan(args)[-1]
    assert api[api.index("--max-n") + 1] == "4"
    assert api[api.index("--inter-token-timeout") + 1] == "5.0"
    assert cli.api_settings(cli.build_parser().parse_args(["api", *api[api.index("--host"):]])).limits.max_n == 4
