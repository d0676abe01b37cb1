"""The chat page at `/`, in a real headless Chromium (Debian's `chromium`, driven by
playwright): a message streams a reply, Stop ends one mid-stream (the server frees its blocks),
the controls reach the request, and with API keys set the page works once given a key."""

from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest

from integration.conftest import start_server, wait_until

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="no Chromium (.ci/run installs Debian's chromium)"
)
KEY = "sk-page-4a7e"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def keyed_embedded_server(tmp_path_factory):
    server = start_server(
        tmp_path_factory,
        "page-keys",
        ["--kv-cache-memory", "256MiB", "--max-model-len", "2048"],
        env={"MODEL_PATH": "/data/model", "OPENAI_API_KEYS": KEY},
    )
    yield server
    server.stop()


def _open(browser, server):
    page = browser.new_page()
    requests = []
    page.on(
        "request",
        lambda r: (
            requests.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions")
            else None
        ),
    )
    page.goto(server.url + "/")
    return page, requests


def _send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def _last_reply(page):
    return page.locator(".msg.assistant").last


def _blocks_in_use(server, headers=None) -> int:
    stats = httpx.get(f"{server.url}/stats", headers=headers or {}, timeout=10).json()
    return stats["kv_blocks_used"]


def _stop_mid_reply(page, server, headers=None) -> None:
    page.fill("#max-tokens", "400")
    _send(page, "Write a long story about a lighthouse keeper.")
    reply = _last_reply(page)
    page.wait_for_function(
        "() => document.querySelector('.msg.assistant:last-child').textContent.length > 0",
        timeout=60_000,
    )
    assert page.is_enabled("#stop")
    page.click("#stop")
    page.wait_for_function(
        "() => document.querySelector('.msg.assistant:last-child').dataset.state === 'stopped'",
        timeout=10_000,
    )
    assert reply.text_content().endswith("stopped")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    # The server saw the client go: the stopped request's KV blocks come back.
    assert wait_until(lambda: _blocks_in_use(server, headers) == 0, deadline=30)


def test_a_message_streams_a_reply_with_the_chosen_controls(browser, embedded_server):
    page, requests = _open(browser, embedded_server)
    page.wait_for_function("() => !document.getElementById('model').textContent.includes('…')")
    assert "SmolLM2" in page.text_content("#model")
    page.fill("#system", "You answer in one short sentence.")
    page.fill("#temperature", "0")
    page.fill("#top-p", "0.9")
    page.fill("#max-tokens", "12")
    _send(page, "What is the capital of France?")
    page.wait_for_function(
        "() => document.querySelector('.msg.assistant:last-child').dataset.state === 'done'",
        timeout=60_000,
    )
    reply = _last_reply(page).text_content()
    assert "finish: " in reply and len(reply.split("tokens,")[0]) > 0
    body = requests[-1]
    assert body["stream"] is True and body["max_tokens"] == 12
    assert body["temperature"] == 0 and body["top_p"] == 0.9
    assert body["messages"][0] == {"role": "system", "content": "You answer in one short sentence."}
    assert body["messages"][-1] == {"role": "user", "content": "What is the capital of France?"}
    # The next turn carries the conversation so far.
    _send(page, "And of Italy?")
    page.wait_for_function(
        "() => document.querySelectorAll('.msg.assistant').length === 2"
        " && document.querySelector('.msg.assistant:last-child').dataset.state === 'done'",
        timeout=60_000,
    )
    roles = [m["role"] for m in requests[-1]["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    page.close()


def test_stop_ends_a_reply_mid_stream(browser, embedded_server):
    page, _ = _open(browser, embedded_server)
    _stop_mid_reply(page, embedded_server)
    page.close()


def test_with_keys_on_the_page_asks_for_one_then_works(browser, keyed_embedded_server):
    server = keyed_embedded_server
    page, _ = _open(browser, server)
    page.wait_for_function("() => document.getElementById('model').textContent.includes('key')")
    page.fill("#max-tokens", "8")
    _send(page, "Hello")
    page.wait_for_selector(".msg.assistant.error")
    assert "401" in _last_reply(page).text_content() or "key" in _last_reply(page).text_content()
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_function("() => document.getElementById('model').textContent.includes('SmolLM2')")
    _send(page, "Hello again")
    page.wait_for_function(
        "() => document.querySelector('.msg.assistant:last-child').dataset.state === 'done'",
        timeout=60_000,
    )
    _stop_mid_reply(page, server, headers={"Authorization": f"Bearer {KEY}"})
    page.close()
