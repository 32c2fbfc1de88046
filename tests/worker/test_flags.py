"""`lmfleet worker`'s flags into its settings: the model located and its engine chosen before anything loads, and
the defaults the settings' own."""

from __future__ import annotations

import argparse

import pytest

from lmfleet import flags
from lmfleet.worker import flags as worker_flags
from lmfleet.worker.app import WorkerSettings


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    worker_flags.add_args(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("files", "name", "engine", "expected"),
    [
        ({}, "nothing-here", "auto", "does not exist"),
        ({"m.bin": "x"}, "m.bin", "auto", "not a .gguf file"),
        ({}, "", "auto", "neither a config.json nor a .gguf"),
        ({"a.gguf": "", "b.gguf": ""}, "", "auto", "several .gguf files (a.gguf, b.gguf)"),
        ({"config.json": "{}"}, "", "llamacpp", "reads .gguf files"),
    ],
)
def test_a_model_path_that_names_nothing_loadable_is_one_line_at_once(tmp_path, files, name, engine, expected):
    for file, text in files.items():
        (tmp_path / file).write_text(text)
    args = parse("--model-path", str(tmp_path / name), "--engine", engine)
    with pytest.raises(SystemExit) as exit_:
        worker_flags.settings(args)
    message = str(exit_.value)
    assert expected in message and "\n" not in message and message.startswith("lmfleet worker: ")


def test_a_gguf_file_or_its_folder_picks_llamacpp_and_answers_to_its_name(tmp_path) -> None:
    (tmp_path / "SmolLM2.Q4.gguf").write_bytes(b"GGUF")
    for path in (tmp_path / "SmolLM2.Q4.gguf", tmp_path):
        settings = worker_flags.settings(parse("--model-path", str(path)))
        assert settings.engine == "llamacpp" and settings.names == [str(path)]
    settings = worker_flags.settings(
        parse("--model-path", str(tmp_path / "SmolLM2.Q4.gguf"), "--engine", "transformers", "--threads", "3")
    )
    assert settings.engine == "transformers" and settings.aliases == ["SmolLM2.Q4"]


def test_the_flags_defaults_are_the_settings_defaults(tmp_path) -> None:
    """The parser takes the worker's defaults from where WorkerSettings takes them, without importing
    lmfleet.worker.app (which loads llguidance): they must stay the settings' own."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    settings = worker_flags.settings(parse("--model-path", str(tmp_path / "m.gguf")))
    default = WorkerSettings(settings.model_path, settings.worker_address)
    for name in ("controller_addresses", "max_queued", "heartbeat_interval_s", "drain_timeout_s", "tool_parser"):
        assert getattr(settings, name) == getattr(default, name), name


@pytest.mark.parametrize(
    ("value", "expected"),
    [("2GiB", 2 << 30), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000), ("4096", 4096), ("0", 0), ("3k", 3000)],
)
def test_byte_sizes(value, expected) -> None:
    assert flags.byte_size(value) == expected


@pytest.mark.parametrize("value", ["", "lots", "2 GiBs", "-1", "1e9"])
def test_a_size_that_is_none_is_refused(value) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        flags.byte_size(value)


@pytest.mark.parametrize("engine", ["llamacpp", "transformers"])
def test_the_prefix_cache_flags_reach_either_engine(tmp_path, engine) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    model = ("--model-path", str(tmp_path / "m.gguf"), "--engine", engine)
    default = worker_flags.settings(parse(*model)).engine_settings
    assert default is not None and default.prefix_cache and default.prefix_cache_host_bytes is None
    given = worker_flags.settings(parse(*model, "--no-prefix-cache", "--prefix-cache-host-bytes", "2GiB"))
    assert given.engine_settings is not None
    assert not given.engine_settings.prefix_cache and given.engine_settings.prefix_cache_host_bytes == 2 << 30
    exact = worker_flags.settings(parse(*model, "--max-num-seqs", "8", "--deterministic")).engine_settings
    assert exact is not None and exact.max_num_seqs == 1 and not exact.prefix_cache
