"""Browser fixtures: Debian's Chromium (`/usr/bin/chromium`, apt package `chromium`) driven by Playwright, every
request off the loopback interface aborted, and a real fleet (controller, a SmolLM2 worker, a tiny-model worker,
the API server) for the pages to talk to."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import Fleet, free_port
from tests.programs import program

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("LMFLEET_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


@pytest.fixture(scope="module")  # not longer: Playwright's sync API holds an event loop; async tests need none
def browser() -> Iterator[playwright.Browser]:
    chromium = program("chromium", CHROMIUM)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        yield browser
        browser.close()


class Offline:
    """Aborts every request that leaves loopback, and remembers it."""

    def __init__(self) -> None:
        self.blocked: list[str] = []

    def __call__(self, route: playwright.Route) -> None:
        url = route.request.url
        if urlsplit(url).scheme in ("data", "blob") or urlsplit(url).hostname in LOOPBACK:
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort("internetdisconnected")


@pytest.fixture
def offline() -> Offline:
    return Offline()


@pytest.fixture
def page(browser: playwright.Browser, offline: Offline) -> Iterator[playwright.Page]:
    context = browser.new_context(viewport={"width": 1360, "height": 860})
    context.route("**/*", offline)
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"the page raised: {errors}"


def shot(page: playwright.Page, path: Path) -> None:
    """A screenshot into the test's tmp dir (and into $LMFLEET_SCREENSHOTS when set, to look at)."""
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("LMFLEET_SCREENSHOTS"):
        Path(os.environ["LMFLEET_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ["LMFLEET_SCREENSHOTS"]) / path.name)


def worker_running(port: int) -> int:
    return httpx.get(f"http://127.0.0.1:{port}/worker/status", timeout=5).json()["running"]


@pytest.fixture(scope="session")
def stack(
    smollm2_gguf: Path, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """controller + SmolLM2 (llama.cpp, one thread) + a tiny random model (transformers) + API server."""
    with Fleet(root=tmp_path_factory.mktemp("ui-fleet")) as f:
        f.controller()
        f.smol_port, f.tiny_port = free_port(), free_port()
        f.worker("worker-smollm2", smollm2_gguf, "--model-names", "smollm2", "--threads", "1", port=f.smol_port)
        f.worker("worker-tiny", tiny_models["alpha"], "--model-names", "tiny", port=f.tiny_port)
        f.api()
        f.wait_models(2)  # one worker per model: both are in the API server's view
        yield f
