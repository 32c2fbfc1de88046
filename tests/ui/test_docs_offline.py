"""`/docs` and `/redoc` of every process render with the network cut: Swagger UI and ReDoc come from the package
(lmfleet.docs), not from a CDN."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import Fleet

from .conftest import Offline, playwright, shot

pytestmark = pytest.mark.timeout(120)
expect = playwright.expect


@pytest.mark.parametrize(
    ("process", "operation"),
    [("api", "/v1/chat/completions"), ("controller", "/register_worker"), ("worker", "/worker/generate")],
)
def test_swagger_ui_lists_the_operations_offline(
    page: playwright.Page, stack: Fleet, offline: Offline, tmp_path: Path, process: str, operation: str
) -> None:
    url = {
        "api": stack.api_url,
        "controller": stack.controller_url,
        "worker": f"http://127.0.0.1:{stack.tiny_port}",
    }[process]
    page.goto(url + "/docs")
    expect(page.locator(".opblock").first).to_be_visible()
    expect(page.locator(f'.opblock-summary-path[data-path="{operation}"]').first).to_be_visible()
    assert page.locator(".opblock").count() >= 3
    shot(page, tmp_path / f"docs-{process}.png")
    assert offline.blocked == []  # nothing was even tried off the machine


def test_redoc_renders_offline(page: playwright.Page, stack: Fleet, offline: Offline, tmp_path: Path) -> None:
    page.goto(stack.api_url + "/redoc")
    expect(page.get_by_text("/v1/chat/completions").first).to_be_attached()
    expect(page.locator("h1").first).to_contain_text("lmfleet")
    shot(page, tmp_path / "redoc.png")
    assert offline.blocked == []


def test_the_docs_assets_are_public_and_cached(stack: Fleet) -> None:
    for path in ("/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css", "/redoc/redoc.standalone.js"):
        resp = httpx.get(stack.api_url + path)
        assert resp.status_code == 200 and len(resp.content) > 10_000
        assert "max-age" in resp.headers["cache-control"]
    assert "cdn." not in httpx.get(stack.api_url + "/docs").text
