"""The web page in a real browser against a real fleet: a chat that streams (SmolLM2), a Stop button that stops the
worker, the dashboard following workers that come and go, API keys, and the Markdown renderer's safety."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import httpx
import pytest

from lmfleet.api.fleet import FleetView
from tests.conftest import Fleet, free_port, module_cmd, wait_until

from .conftest import Offline, playwright, shot, worker_running

pytestmark = pytest.mark.timeout(300)
expect = playwright.expect


def open_chat(page: playwright.Page, stack: Fleet, model: str) -> None:
    page.goto(stack.api_url + "/")  # a browser at / lands on the page
    assert page.url == stack.api_url + "/ui"
    expect(page.locator("#model option")).to_have_count(2)
    page.select_option("#model", model)


def ask(page: playwright.Page, text: str) -> None:
    page.fill("#prompt", text)
    page.keyboard.press("Enter")  # Enter sends


def test_a_chat_streams_the_reply_and_keeps_the_conversation(
    page: playwright.Page, stack: Fleet, offline: Offline, tmp_path: Path
) -> None:
    open_chat(page, stack, "smollm2")
    page.locator("#temperature").fill("0")
    page.fill("#max-tokens", "48")
    ask(page, "What is the capital of France?")
    first = page.locator(".msg.assistant").nth(0)
    expect(first.locator(".meta")).to_contain_text("tokens", timeout=60_000)
    expect(first.locator(".body")).to_contain_text("Paris")
    expect(page.locator("#send")).to_be_visible()

    # A longer answer: its text shows while the reply is still streaming, then the stream ends.
    page.fill("#max-tokens", "160")
    ask(page, "Tell me a story about a dragon and a knight.")
    second = page.locator(".msg.assistant").nth(1)
    page.wait_for_function(
        "() => { const m = document.querySelectorAll('.msg.assistant')[1];"
        " return m && m.classList.contains('streaming') && m.querySelector('.body').textContent.trim().length > 0 }",
        polling=50,
        timeout=60_000,
    )
    expect(page.locator("#stop")).to_be_visible()
    expect(second.locator(".meta")).to_contain_text("tokens", timeout=120_000)
    assert len(second.locator(".body").inner_text().split()) > 20
    expect(page.locator(".msg.user")).to_have_count(2)
    shot(page, tmp_path / "chat.png")
    assert offline.blocked == []


def test_stop_cancels_the_generation_on_the_worker(page: playwright.Page, stack: Fleet, tmp_path: Path) -> None:
    open_chat(page, stack, "smollm2")
    page.locator("#temperature").fill("0")
    page.fill("#max-tokens", "4000")
    ask(page, "Write a long essay on the history of the Roman Empire.")
    reply = page.locator(".msg.assistant").last
    page.wait_for_function(
        "() => document.querySelector('.msg.assistant.streaming .body')?.textContent.trim().length > 0",
        polling=50,
        timeout=60_000,
    )
    assert worker_running(stack.smol_port) == 1  # the worker is generating it
    page.click("#stop")
    expect(reply.locator(".meta")).to_have_text("Stopped.")
    expect(page.locator("#send")).to_be_visible()
    wait_until(lambda: worker_running(stack.smol_port) == 0, timeout=30, what="the worker to stop generating")
    shot(page, tmp_path / "stopped.png")


def test_the_dashboard_follows_workers_as_they_come_and_go(
    page: playwright.Page, stack: Fleet, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    httpx.post(  # some traffic for the request figures
        stack.api_url + "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        timeout=60,
    ).raise_for_status()
    page.goto(stack.api_url + "/ui#fleet")
    rows = page.locator("#workers tbody tr[data-address]")
    expect(rows).to_have_count(2)
    smol = page.locator(f'tr[data-address="http://127.0.0.1:{stack.smol_port}"]')
    expect(smol.locator(".state")).to_have_text("ready")
    expect(smol).to_contain_text("smollm2")
    assert re.fullmatch(r"—|\d+%", smol.locator("td").nth(7).inner_text().strip())  # KV use, when reported
    assert re.fullmatch(r"—|\d+%", smol.locator("td").nth(8).inner_text().strip())  # cache hits, when reported
    expect(smol.locator("td").nth(9)).to_contain_text("s ago")
    expect(page.locator("#t-workers")).to_have_text("2 / 2")
    expect(page.locator("#t-rps")).not_to_have_text("—")
    expect(page.locator("#t-controller")).to_have_text("controller up")

    port = free_port()
    extra = stack.add("worker-extra", module_cmd("worker", "--port", str(port), "--model-path",
                      str(tiny_models["beta"]), "--model-names", "extra", "--controller-address",
                      stack.controller_url, "--heartbeat-interval", "0.5"))  # fmt: skip
    try:
        row = page.locator(f'tr[data-address="http://127.0.0.1:{port}"]')
        expect(row.locator(".state")).to_have_text("ready", timeout=120_000)
        expect(row).to_contain_text("extra")
        expect(page.locator("#t-workers")).to_have_text("3 / 3")
        page.wait_for_timeout(1500)  # a few polls: the load sparklines have points
        shot(page, tmp_path / "fleet.png")

        os.kill(extra.popen.pid, signal.SIGKILL)  # gone without a word: the controller expires it
        expect(row).to_have_count(0, timeout=30_000)
        expect(rows).to_have_count(2)
    finally:
        extra.stop()


def test_with_api_keys_the_page_asks_for_one(page: playwright.Page, stack: Fleet, tmp_path: Path) -> None:
    key = "sk-ui-test-key"
    port = free_port()
    api = stack.add("api-keys", module_cmd("api", "--port", str(port), "--controller-address", stack.controller_url),
                    env={"LMFLEET_API_KEYS": key})  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url + "/health").status_code == 200, timeout=60, procs=[api], what="API up")
        assert httpx.get(url + "/v1/fleet").status_code == 401
        page.goto(url + "/")
        expect(page.locator("#key-form")).to_be_visible()
        expect(page.locator("#key-status")).to_have_text("This server needs an API key.")
        page.fill("#api-key", "sk-wrong")
        page.click("#key-form button")
        expect(page.locator("#key-status")).to_have_text("This key was refused.")
        page.fill("#api-key", key)
        page.click("#key-form button")
        expect(page.locator("#model option")).to_have_count(2)
        assert page.evaluate("sessionStorage.getItem('lmfleet.apiKey')") == key
        assert page.evaluate("localStorage.length") == 0  # gone with the tab
        page.select_option("#model", "tiny")
        page.fill("#max-tokens", "8")
        ask(page, "hello")
        expect(page.locator(".msg.assistant .meta")).to_contain_text("tokens", timeout=60_000)
        page.goto(url + "/ui#fleet")  # the key is still there after a reload
        expect(page.locator("#workers tbody tr[data-address]")).to_have_count(2)
        shot(page, tmp_path / "keys.png")
    finally:
        api.stop()


@pytest.mark.parametrize(
    ("markdown", "html"),
    [
        ("**bold** and *it* and `x<y`", "<p><strong>bold</strong> and <em>it</em> and <code>x&lt;y</code></p>"),
        ("<img src=x onerror=alert(1)>", "<p>&lt;img src=x onerror=alert(1)&gt;</p>"),
        ("[a](javascript:alert(1))", "<p>[a](javascript:alert(1))</p>"),
        ('[a](https://x.test/"onmouseover=1)', '<p><a href="https://x.test/&quot;onmouseover=1" target="_blank" '
         'rel="noopener noreferrer">a</a></p>'),
        ("```html\n<b>\n```", '<pre><code class="language-html">&lt;b&gt;</code></pre>'),
        ("# Title\n- one\n- two\n\n1. first", "<h1>Title</h1><ul><li>one</li><li>two</li></ul><ol><li>first</li></ol>"),
        ("> quoted **text**", "<blockquote><p>quoted <strong>text</strong></p></blockquote>"),
        ("```\nstill streaming", "<pre><code>still streaming</code></pre>"),
    ],
)  # fmt: skip
def test_markdown_is_rendered_and_html_is_never_let_through(
    page: playwright.Page, stack: Fleet, markdown: str, html: str
) -> None:
    page.goto(stack.api_url + "/ui")
    assert page.evaluate("text => window.lmfleetMarkdown.render(text)", markdown) == html


def test_the_dashboard_draws_every_state_kv_use_cache_hits_and_untrusted_text_as_text(
    page: playwright.Page, stack: Fleet, tmp_path: Path
) -> None:
    """The page's drawing of what `/v1/fleet` may say (a schema-valid answer, served in place of the real one):
    KV use as a bar, the prefix cache's hit rate, ejected with its reason, draining, a worker's self-reported names
    shown as text, and the models of a worker that loads them on demand with their states, memory and load times."""
    history = [0.0] * 59 + [12.5]
    workers = [
        {"address": "http://10.0.0.1:21002", "models": ["m"], "state": "ready", "running": 3, "queued": 1, "open": 2,
         "tokens_per_s": 42.0, "kv_cache_usage": 0.42, "prefix_cache_hit_rate": 0.875, "heartbeat_age_s": 0.7,
         "tokens_per_s_history": history},
        {"address": "http://10.0.0.2:21002", "models": ["<img src=x onerror=alert(1)>"], "state": "ejected",
         "reason": "worker sent nothing for 30s", "running": 0, "queued": 0, "open": 0, "tokens_per_s": 0.0,
         "heartbeat_age_s": 4.0, "tokens_per_s_history": [0.0] * 60},
        {"address": "http://10.0.0.3:21002", "models": [], "state": "draining", "running": 1, "queued": 0, "open": 1,
         "tokens_per_s": 3.0, "tokens_per_s_history": [0.0] * 60},
        {"address": "http://10.0.0.4:21002", "models": ["qwen", "smol"], "state": "ready", "running": 0, "queued": 0,
         "open": 0, "tokens_per_s": 0.0, "tokens_per_s_history": [0.0] * 60, "memory_bytes": 1_500_000_000,
         "memory_budget_bytes": 8_000_000_000,
         "model_states": [{"name": "qwen", "state": "loaded", "pinned": True, "memory_bytes": 1_500_000_000,
                           "load_seconds": 3.25},
                          {"name": "smol", "state": "loading"}]},
    ]  # fmt: skip
    requests = {"per_s": 1.5, "in_progress": 3, "latency_p50_s": 0.25, "latency_p95_s": 2.5, "first_token_p50_s": 0.05,
                "per_s_history": [1.0] * 60, "errors_per_s_history": [0.0] * 60,
                "latency_p50_s_history": [None] * 30 + [0.25] * 30}  # fmt: skip
    view = FleetView.model_validate(
        {"controller": "down", "window_s": 300, "step_s": 5, "requests": requests, "workers": workers}
    )
    page.route("**/v1/fleet", lambda route: route.fulfill(json=view.model_dump(mode="json")))
    page.goto(stack.api_url + "/ui#fleet")
    rows = page.locator("#workers tbody tr[data-address]")
    expect(rows).to_have_count(4)
    ready, ejected, draining, on_demand = (rows.nth(i) for i in range(4))
    expect(ready.locator("td").nth(7)).to_have_text("42%")
    expect(ready.locator("td").nth(8)).to_have_text("88%")  # the prefix cache's hit rate
    fill, bar = ready.locator(".kv .bar span").bounding_box(), ready.locator(".kv .bar").bounding_box()
    assert fill and bar and fill["width"] / bar["width"] == pytest.approx(0.42, abs=0.02)  # drawn, CSP allows it
    expect(ready.locator("td").nth(6)).to_have_text(re.compile(r"^42\.0tokens/s"))  # the number, then its sparkline
    expect(ejected.locator(".state")).to_have_text("ejected")
    expect(ejected.locator(".state")).to_have_attribute("title", "worker sent nothing for 30s")
    expect(ejected.locator("td").nth(1)).to_have_text("<img src=x onerror=alert(1)>")
    assert ejected.locator("img").count() == 0
    expect(ejected.locator("td").nth(7)).to_have_text("—")
    expect(ejected.locator("td").nth(8)).to_have_text("—")  # no hit rate reported
    expect(draining.locator(".state")).to_have_text("draining")
    qwen, smol = on_demand.locator(".model[data-model=qwen]"), on_demand.locator(".model[data-model=smol]")
    expect(qwen).to_have_text(re.compile(r"qwen\s*loaded · pinned\s*1\.5 GB · loaded in 3\.25 s"))
    expect(smol.locator(".model-state")).to_have_text("loading")
    expect(on_demand.locator(".model-memory")).to_have_text("1.5 GB of 8.0 GB held")
    expect(page.locator("#t-workers")).to_have_text("2 / 4")
    expect(page.locator("#t-controller")).to_have_text("controller down")
    expect(page.locator("#t-latency")).to_have_text("250 ms · 2.50 s")
    expect(page.locator("#t-progress")).to_have_text("3 in progress")
    shot(page, tmp_path / "fleet-states.png")
