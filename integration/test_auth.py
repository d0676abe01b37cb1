"""OPENAI_API_KEYS: every API route needs one of the keys; /health stays open."""

from __future__ import annotations

import httpx
import pytest

from integration.conftest import start_server

KEYS = ["sk-first", "sk-second"]
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, tiny_folder):
    server = start_server(
        tmp_path_factory,
        "auth",
        ["--model-path", str(tiny_folder), "--kv-cache-memory", "32MiB"],
        env={"OPENAI_API_KEYS": ",".join(KEYS)},
    )
    yield server
    server.stop()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer sk-wrong"},
        {"Authorization": "sk-first"},
        {"Authorization": "Basic sk-first"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer sk-first-but-longer"},
    ],
)
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/v1/models"])
def test_missing_or_wrong_key_is_401(keyed_server, headers, route):
    if route == "/v1/models":
        r = httpx.get(keyed_server.url + route, headers=headers, timeout=30)
    else:
        body = BODY if "chat" in route else {"prompt": "hi", "max_tokens": 2}
        r = httpx.post(keyed_server.url + route, json=body, headers=headers, timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("key", KEYS)
def test_each_key_is_accepted(keyed_server, key):
    r = httpx.post(
        f"{keyed_server.url}/v1/chat/completions",
        json=BODY,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert r.status_code == 200


def test_health_needs_no_key(keyed_server):
    assert httpx.get(f"{keyed_server.url}/health", timeout=10).status_code == 200


def test_keys_never_appear_in_the_logs(keyed_server):
    for key in KEYS:
        assert key not in keyed_server.logs()
