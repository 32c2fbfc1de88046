"""No secret leaks: a real controller, worker and API server, given canary API keys and a canary registration
secret (by flag, by environment and by key file), are driven through good and bad requests, rogue registrations
and a shutdown, at debug log level. Then every log line and every response (bodies and headers) is searched for
every canary, including the wrong key and the wrong secret that attackers presented."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Fleet, free_port, module_cmd

pytestmark = pytest.mark.timeout(240)


def canary(kind: str) -> str:
    return f"{kind}-canary-{secrets.token_hex(8)}"


KEY_FLAG, KEY_ENV, KEY_FILE = canary("sk-flag"), canary("sk-env"), canary("sk-file")
SECRET = canary("regsecret")
WRONG_KEY, WRONG_SECRET = canary("sk-wrong"), canary("regsecret-wrong")
CANARIES = [KEY_FLAG, KEY_ENV, KEY_FILE, SECRET, WRONG_KEY, WRONG_SECRET]


class Recorder:
    """Every response the test sees, so they can all be searched at the end."""

    def __init__(self) -> None:
        self.http = httpx.Client(timeout=60)
        self.seen: list[str] = []

    def __call__(self, method: str, url: str, **kw) -> httpx.Response:  # noqa: ANN003
        resp = self.http.request(method, url, **kw)
        self.seen.append(f"{resp.status_code}\n{resp.headers!r}\n{resp.text}")  # what came back, not what was sent
        return resp


@pytest.fixture(scope="module")
def fleet(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("canary")
    key_file = root / "keys.txt"
    key_file.write_text(KEY_FILE + "\n")
    debug = ["--log-level", "debug"]
    worker_port = free_port()
    with Fleet(root=root) as f:
        # the secret by flag to the controller and the API server, by environment to the worker
        f.controller("--registration-secret", SECRET, *debug)
        f.add(
            "worker",
            module_cmd("worker", "--port", str(worker_port), "--model-path", str(tiny_models["alpha"]),
                       "--model-names", "alpha", "--controller-address", f.controller_url,
                       "--heartbeat-interval", "0.5", *debug),
            env={"LMFLEET_REGISTRATION_SECRET": SECRET},
        )  # fmt: skip
        f.add(
            "api",
            module_cmd("api", "--port", str(f.api_port), "--controller-address", f.controller_url,
                       "--registration-secret", SECRET, "--api-keys", KEY_FLAG, "--api-key-file", str(key_file),
                       "--max-request-bytes", "65536", *debug),
            env={"LMFLEET_API_KEYS": KEY_ENV},
        )  # fmt: skip
        f.worker_url = f"http://127.0.0.1:{worker_port}"
        f.wait_models(1, headers={"Authorization": f"Bearer {KEY_FLAG}"})
        yield f


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_no_secret_in_any_log_or_response(fleet: Fleet) -> None:
    call = Recorder()
    api, ctl, wrk = fleet.api_url, fleet.controller_url, fleet.worker_url
    chat = {"model": "alpha", "max_tokens": 8, "messages": [{"role": "user", "content": "Say something."}]}

    # good requests, one per way the keys were given
    assert call("POST", api + "/v1/chat/completions", json=chat, headers=bearer(KEY_FLAG)).status_code == 200
    stream = {"model": "alpha", "prompt": "Once", "max_tokens": 8, "stream": True}
    assert call("POST", api + "/v1/completions", json=stream, headers=bearer(KEY_ENV)).status_code == 200
    assert call("GET", api + "/v1/models", headers=bearer(KEY_FILE)).status_code == 200
    assert call("GET", api + "/health").status_code == 200

    # bad keys, presented every which way
    for headers in ({}, bearer(WRONG_KEY), {"Authorization": f"Basic {WRONG_KEY}"}, {"X-Api-Key": WRONG_KEY}):
        error_of(call("POST", api + "/v1/chat/completions", json=chat, headers=headers), 401)
    error_of(call("GET", api + f"/v1/models?api_key={WRONG_KEY}"), 401)

    # bad input with a good key
    good = bearer(KEY_ENV)
    error_of(call("POST", api + "/v1/chat/completions", content=b'{"model": "alpha", "model": 1}', headers=good), 400)
    error_of(call("POST", api + "/v1/chat/completions", content=b"\xff{", headers=good), 400)
    error_of(call("POST", api + "/v1/chat/completions", json={**chat, "n": 99}, headers=good), 400)
    error_of(call("POST", api + "/v1/completions", content=b"{" + b" " * 70_000 + b"}", headers=good), 413)
    error_of(call("POST", api + "/v1/chat/completions", json={**chat, "model": "nope"}, headers=good), 404)
    error_of(call("GET", api + "/v1/chat/completions", headers=good), 405)
    over = call("POST", api + "/v1/chat/completions", json={**chat, "max_tokens": 1_000_000}, headers=good)
    assert error_of(over, 400)["code"] == "context_length_exceeded"  # the real worker's check, passed through

    # a rogue worker: wrong secret, no secret
    rogue = {"worker_name": "http://127.0.0.1:1", "worker_status": {"model_names": ["alpha"]}}
    error_of(call("POST", ctl + "/register_worker", json=rogue, headers=bearer(WRONG_SECRET)), 401)
    error_of(call("POST", ctl + "/receive_heart_beat", json={"worker_name": fleet.worker_url}), 401)
    error_of(call("POST", ctl + "/unregister_worker", json={"worker_name": fleet.worker_url}), 401)
    workers = call("GET", ctl + "/workers").json()["workers"]
    assert [w["address"] for w in workers] == [fleet.worker_url]  # the real one only
    assert call("POST", ctl + "/list_models").json() == {"models": ["alpha"]}

    # the worker's own routes
    assert call("GET", wrk + "/worker/status").status_code == 200
    assert call("POST", wrk + "/worker_get_status").status_code == 200
    error_of(call("POST", wrk + "/worker/generate", json={"request_id": "x"}), 401)  # generating needs the secret
    error_of(call("POST", wrk + "/worker/generate", json={"request_id": "x"}, headers=bearer(WRONG_SECRET)), 401)
    error_of(call("POST", wrk + "/worker/generate", json={"request_id": "x"}, headers=bearer(SECRET)), 400)

    # whatever /metrics each process has (none yet: then a 404, or a 401 behind the API key)
    for base, headers in ((api, good), (ctl, {}), (wrk, {})):
        call("GET", base + "/metrics", headers=headers)

    call.http.close()
    fleet.stop()  # shutdown logs too (unregistering, draining)
    logs = {name: proc.log.read_text(errors="replace") for name, proc in fleet.procs.items()}
    assert "invalid API key" in logs["api"]  # the refusals were logged...
    assert "registration secret" in logs["controller"]
    assert "registered" in logs["controller"]
    for name, text in [*logs.items(), *((f"response {i}", r) for i, r in enumerate(call.seen))]:
        for value in CANARIES:  # ...and no canary anywhere
            assert value not in text, f"{name} contains a secret:\n{text[:2000]}"
