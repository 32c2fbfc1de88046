"""With API keys configured, every route of the API server is either public (`access.is_public`) or answers
401 without a key: the test walks `app.routes`, so a route added later is checked without anyone listing it."""

from __future__ import annotations

import re

import httpx
import pytest
from starlette.routing import BaseRoute, Route, WebSocketRoute

from lmfleet.api.access import PUBLIC_PATHS, is_public
from lmfleet.api.messages import ERROR_PATHS
from tests.api.fakes import API, assert_error, serve
from tests.fakes import running

KEY = "sk-route-check-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def concrete(path: str) -> str:
    """`/v1/models/{model:path}` -> `/v1/models/echo`."""
    return re.sub(r"\{[^}]+\}", "echo", path)


def http_routes(routes: list[BaseRoute]) -> list[tuple[str, str]]:
    out = []
    for route in routes:
        assert not isinstance(route, WebSocketRoute), f"{route.path}: the key gate covers HTTP only"
        assert isinstance(route, Route), f"{route!r}: only plain routes are expected (mounts bypass this test)"
        out += [(method, route.path) for method in sorted(route.methods or {"GET"}) if method != "HEAD"]
    return out


async def test_every_route_is_public_or_needs_a_key() -> None:
    async with serve(api_keys=[KEY]) as api:
        routes = http_routes(api.app.routes)
        assert len(routes) >= 8
        paths = {path for _, path in routes}
        assert {"/health", "/docs", "/openapi.json", "/ui", "/docs/swagger-ui-bundle.js"} <= paths & PUBLIC_PATHS
        assert "/v1/fleet" in paths - PUBLIC_PATHS
        for method, path in routes:
            body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]} if method == "POST" else None
            anonymous = await api.raw.request(method, concrete(path), json=body)
            if is_public(method, path):
                assert anonymous.status_code != 401, f"{method} {path} is public but asked for a key"
            else:
                if path.startswith(tuple(ERROR_PATHS)):  # Anthropic's routes spell their errors Anthropic's way
                    assert anonymous.status_code == 401
                    err = anonymous.json()["error"]
                    assert err["type"] == "authentication_error"
                else:
                    err = assert_error(anonymous, 401, code="invalid_api_key")
                assert KEY not in err["message"]
                assert anonymous.headers["www-authenticate"] == "Bearer"
                for auth in (AUTH, {"x-api-key": KEY}):  # OpenAI's clients send the one, Anthropic's the other
                    keyed = await api.raw.request(method, concrete(path), json=body, headers=auth)
                    assert keyed.status_code != 401, f"{method} {path} refused a good key: {keyed.text}"


@pytest.mark.parametrize(
    "path",
    ["/nothing", "/v1", "/v1/", "/v2/chat/completions", "/HEALTH", "/health/", "//health", "/docs/../v1/models",
     "/metrics", "/admin", "/openapi.json/x", "/health%2f..%2fv1"],
)  # fmt: skip
async def test_unknown_and_lookalike_paths_need_a_key(path: str) -> None:
    async with serve(api_keys=[KEY]) as api:
        for method in ("GET", "POST", "DELETE"):
            resp = await api.raw.request(method, API + path)
            assert_error(resp, 401)


async def test_public_paths_hold_under_a_root_path() -> None:
    """Behind a proxy that mounts the server under a prefix, the same routes are public, the others are not."""
    async with serve(api_keys=[KEY]) as api, running(api.app) as (asgi, _):
        transport = httpx.ASGITransport(app=asgi, root_path="/lmfleet")
        async with httpx.AsyncClient(transport=transport, base_url=API) as client:
            assert (await client.get("/lmfleet/health")).status_code == 200
            assert_error(await client.get("/lmfleet/v1/models"), 401)
            assert (await client.get("/lmfleet/v1/models", headers=AUTH)).status_code == 200
