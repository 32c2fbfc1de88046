"""Safe by default from the command line: every process binds 127.0.0.1, CORS is off, no key or secret is
invented; secrets can come from the environment or a file instead of argv; limits are flags that can only
tighten."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from lmfleet import cli
from lmfleet.api import flags as api_flags
from lmfleet.api.access import RequestLimits
from lmfleet.api.app import create_app

PARTS = {
    "controller": [],
    "worker": ["--model-path", "m"],
    "api": [],
    "serve": ["--demo"],
}


@pytest.fixture(autouse=True)
def _no_secrets_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMFLEET_API_KEYS", raising=False)
    monkeypatch.delenv("LMFLEET_REGISTRATION_SECRET", raising=False)


def parse(*argv: str):  # noqa: ANN201
    return cli.build_parser().parse_args(list(argv))


@pytest.mark.parametrize("part", sorted(PARTS))
def test_every_process_binds_loopback_unless_told(part: str) -> None:
    assert parse(part, *PARTS[part]).host == "127.0.0.1"
    assert parse(part, *PARTS[part], "--host", "0.0.0.0").host == "0.0.0.0"


def test_api_defaults_are_closed() -> None:
    args = parse("api")
    settings = api_flags.settings(args)
    assert settings.allow_origins is None  # CORS off
    assert settings.api_keys is None and settings.registration_secret is None  # nothing invented
    assert settings.limits == RequestLimits()
    assert settings.max_request_bytes == 4 * 1024 * 1024
    assert cli.build_parser().parse_args(["controller"]).allowed_worker_networks is None


def test_secrets_from_env_file_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("sk-from-file\n\n  sk-second-from-file  \n")
    monkeypatch.setenv("LMFLEET_API_KEYS", "sk-env-1, sk-env-2")
    monkeypatch.setenv("LMFLEET_REGISTRATION_SECRET", "secret-from-env")
    settings = api_flags.settings(parse("api", "--api-keys", "sk-flag", "--api-key-file", str(key_file)))
    assert settings.api_keys == ["sk-flag", "sk-env-1", "sk-env-2", "sk-from-file", "sk-second-from-file"]
    assert settings.registration_secret == "secret-from-env"
    assert "sk-" not in repr(settings) and "secret-from-env" not in repr(settings)
    flag = api_flags.settings(parse("api", "--registration-secret", "secret-from-flag"))
    assert flag.registration_secret == "secret-from-flag"


def test_limit_flags_reach_the_settings_and_cannot_loosen() -> None:
    args = parse(
        "api",
        "--max-n", "2",
        "--max-stop", "1",
        "--max-stop-chars", "8",
        "--max-messages", "3",
        "--max-message-chars", "100",
        "--max-request-bytes", "5000",
    )  # fmt: skip
    settings = api_flags.settings(args)
    assert settings.limits == RequestLimits(
        max_n=2, max_stop=1, max_stop_chars=8, max_messages=3, max_message_chars=100
    )
    assert settings.max_request_bytes == 5000
    for bad in (["--max-n", "0"], ["--max-n", "17"], ["--max-stop", "5"], ["--max-request-bytes", "0"]):
        with pytest.raises(SystemExit):
            cli.run_api(parse("api", *bad))  # refused before anything binds


@pytest.mark.parametrize("flag", ["--allowed-origins", "--allow-origins"])
async def test_cors_is_on_only_with_the_flag(flag: str) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    on = create_app(api_flags.settings(parse("api", flag, "https://app.example, https://other.example")))
    off = create_app(api_flags.settings(parse("api")))
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=on), base_url="http://api") as with_cors,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=off), base_url="http://api") as without,
    ):
        resp = await with_cors.options("/v1/chat/completions", headers=preflight)
        assert resp.status_code == 200
        assert resp.headers["access-control-allow-origin"] == "https://app.example"
        resp = await with_cors.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in resp.headers
        resp = await with_cors.get("/health", headers={"Origin": "https://other.example"})
        assert resp.headers["access-control-allow-origin"] == "https://other.example"

        resp = await without.options("/v1/chat/completions", headers=preflight)
        assert resp.status_code == 405 and "access-control-allow-origin" not in resp.headers
        resp = await without.get("/health", headers={"Origin": "https://app.example"})
        assert resp.status_code == 200 and "access-control-allow-origin" not in resp.headers
