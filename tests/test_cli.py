"""FastChat users' command lines start lmfleet unchanged."""

from __future__ import annotations

import logging

import pytest

from lmfleet import cli
from lmfleet.api import flags as api_flags
from lmfleet.engine.speculative import SpecSettings
from lmfleet.flags import api_keys, warn_ignored
from lmfleet.worker import flags as worker_flags


def test_fastchat_worker_command_line_parses_with_the_same_meaning(tmp_path) -> None:
    (tmp_path / "vicuna").mkdir()
    (tmp_path / "vicuna" / "config.json").write_text("{}")
    args = cli.build_parser().parse_args(
        [
            "worker",
            "--host",
            "127.0.0.1",
            "--port",
            "21003",
            "--worker-address",
            "http://127.0.0.1:21003",
            "--controller-address",
            "http://127.0.0.1:21001",
            "--model-path",
            str(tmp_path / "vicuna"),
            "--model-names",
            "vicuna-7b,gpt-3.5-turbo",
            "--device",
            "cpu",
            "--num-gpus",
            "1",
            "--conv-template",
            "vicuna_v1.1",
            "--limit-worker-concurrency",
            "5",
            "--stream-interval",
            "2",
            "--load-8bit",
        ]
    )
    settings = worker_flags.settings(args)
    assert settings.model_names == ["vicuna-7b", "gpt-3.5-turbo"]
    assert settings.max_queued == 5 and settings.worker_address == "http://127.0.0.1:21003"
    assert settings.controller_addresses == ["http://127.0.0.1:21001"]
    assert settings.engine == "transformers" and settings.engine_settings.device == "cpu"
    assert settings.conv_template == "vicuna_v1.1"  # FastChat clients are prompted with it (lmfleet.worker.fastchat)


def test_ignored_fastchat_flags_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    args = cli.build_parser().parse_args(["worker", "--model-path", "m", "--stream-interval", "4", "--load-8bit"])
    with caplog.at_level(logging.WARNING, logger="lmfleet"):
        warn_ignored(args)
    assert "--stream-interval" in caplog.text and "--load-8bit" in caplog.text
    assert "--num-gpus" not in caplog.text  # not given, not reported


def test_an_unknown_conv_template_is_refused_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["worker", "--model-path", "m", "--conv-template", "no-such-template"])
    assert "qwen-7b-chat" in capsys.readouterr().err  # the choices are listed


def test_fastchat_api_and_controller_command_lines_parse() -> None:
    api = cli.build_parser().parse_args(
        [
            "api",
            "--host",
            "127.0.0.1",
            "--port",
            "8000",
            "--controller-address",
            "http://127.0.0.1:21001",
            "--allow-credentials",
            "--allowed-origins",
            "http://a.example",
            "--api-keys",
            "k1,k2",
        ]
    )
    assert api.allowed_origins == ["http://a.example"] and api_keys(api) == ["k1", "k2"]
    ctl = cli.build_parser().parse_args(["controller", "--dispatch-method", "lottery"])
    assert ctl.dispatch_method == "lottery" and ctl.host == "127.0.0.1"


def test_tls_is_not_silently_ignored() -> None:
    with pytest.raises(SystemExit):  # FastChat's --ssl would mean TLS; lmfleet expects a terminator in front
        cli.build_parser().parse_args(["api", "--ssl"])


def test_serve_waits_for_model_names_not_a_count_of_workers(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Two replicas of one model register one name: `serve` must not wait for a second name that never comes."""
    from lmfleet import serve

    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF")
    b.write_bytes(b"GGUF")
    parse = cli.build_parser().parse_args
    named = cli.serve_plan(parse(["serve", "--model-path", str(a), "--model-names", "x,y", "--model-path", str(b)]))
    assert named.models == {"x", "y", str(b)}
    api = named.children[-1].argv  # the API server answers 503 (starting), not 404, for them until they register
    assert api[api.index("--expect-models") + 1].split(",") == sorted(named.models)
    replicas = cli.serve_plan(parse(["serve", "--model-path", str(a), "--model-path", str(a)]))
    assert replicas.models == {str(a)} and len(replicas.children) == 4

    class Listing:
        def json(self) -> dict:
            return {"data": [{"id": str(a)}]}

    class Alive:
        def poll(self) -> None:
            return None

    monkeypatch.setattr(serve.httpx, "get", lambda *a, **k: Listing())
    replicas.ready_timeout_s = 5
    assert serve.wait_ready(replicas, [Alive() for _ in range(4)], lambda: False) == [str(a)]


def test_serve_forwards_the_engine_flags_and_the_api_limits_and_timeouts(tmp_path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    args = cli.build_parser().parse_args(
        [
            "serve",
            "--model-path",
            str(tmp_path / "m.gguf"),
            "--max-n",
            "4",
            "--inter-token-timeout",
            "5",
            "--threads",
            "2",
            "--max-num-seqs",
            "8",
            "--spec-type",
            "ngram",
            "--spec-draft-n-max",
            "6",
            "--metrics-public",
            "--dispatch-method",
            "shortest_queue",
        ]
    )
    plan = cli.serve_plan(args)
    worker, api = plan.children[1].argv, plan.children[-1].argv
    assert worker[worker.index("--threads") + 1] == "2" and worker[worker.index("--max-num-seqs") + 1] == "8"
    assert api[api.index("--max-n") + 1] == "4"
    assert api[api.index("--inter-token-timeout") + 1] == "5.0"
    api_settings = api_flags.settings(cli.build_parser().parse_args(["api", *api[api.index("--host") :]]))
    assert api_settings.limits.max_n == 4 and api_settings.metrics_public
    assert api_settings.dispatch_policy == "shortest_queue"  # where requests are dispatched: the API server
    worker_args = cli.build_parser().parse_args(["worker", *worker[worker.index("--port") :]])
    engine = worker_flags.settings(worker_args).engine_settings
    assert engine.n_threads == 2
    assert engine.speculative == SpecSettings(type="ngram", draft_max=6)
    assert "LMFLEET_REGISTRATION_SECRET" in plan.env and not any("SECRET" in a for a in worker + api)


def test_speculative_decoding_flags_that_cannot_run_are_one_line(tmp_path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    base = ["worker", "--model-path", str(tmp_path / "m.gguf")]
    for extra in (["--spec-type", "draft"], ["--draft-model-path", "d.gguf"], ["--spec-draft-n-max", "0"]):
        with pytest.raises(SystemExit, match="draft"):
            worker_flags.settings(cli.build_parser().parse_args([*base, *extra]))


def test_serve_with_a_model_path_that_names_nothing_says_so_before_starting_anything(tmp_path) -> None:
    with pytest.raises(SystemExit, match="does not exist"):
        cli.serve_plan(cli.build_parser().parse_args(["serve", "--model-path", str(tmp_path / "nope")]))


def test_serve_runs_a_chat_model_and_an_embedding_model_side_by_side(tmp_path, minilm) -> None:
    (tmp_path / "chat.gguf").write_bytes(b"GGUF")
    argv = ["serve", "--model-path", str(tmp_path / "chat.gguf"), "--model-path", str(minilm), "--matryoshka"]
    argv += ["--no-prefix-cache", "--prefix-cache-host-bytes", "1GiB"]
    plan = cli.serve_plan(cli.build_parser().parse_args(argv))
    workers = [c.argv for c in plan.children if c.name.startswith("worker")]
    settings = [
        worker_flags.settings(cli.build_parser().parse_args(["worker", *w[w.index("--port") :]])) for w in workers
    ]
    assert [s.engine for s in settings] == ["llamacpp", "embedding"]  # `--engine auto` for each model
    assert settings[1].engine_settings.matryoshka and settings[1].aliases == ["model"]
    chat = settings[0].engine_settings
    assert not chat.prefix_cache and chat.prefix_cache_host_bytes == 1 << 30
    assert len({s.worker_address for s in settings}) == 2
    assert plan.models == {str(tmp_path / "chat.gguf"), str(minilm)}


def test_responses_storage_flags(tmp_path) -> None:
    """Stored responses: a temporary database by default (a restart keeps nothing), a file with --responses-db,
    none with --no-responses-store; `serve` hands both to its API server."""
    from lmfleet.api.response_store import TEMPORARY

    parse = cli.build_parser().parse_args
    assert api_flags.settings(parse(["api"])).responses_db == TEMPORARY
    db = str(tmp_path / "r.sqlite3")
    assert api_flags.settings(parse(["api", "--responses-db", db])).responses_db == db
    assert api_flags.settings(parse(["api", "--no-responses-store"])).responses_db is None
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    for flags, expected in ((["--responses-db", db], db), (["--no-responses-store"], None)):
        api = cli.serve_plan(parse(["serve", "--model-path", str(tmp_path / "m.gguf"), *flags])).children[-1].argv
        assert api_flags.settings(parse(["api", *api[api.index("--host") :]])).responses_db == expected
