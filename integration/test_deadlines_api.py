"""Deadlines through the HTTP server: --request-timeout ends a long request with finish_reason
`timeout` and its text so far; --queue-timeout answers a request that cannot start in time with
429 `queue_timeout`; the blocks of both come back.

The embedded model decodes ~40 tokens/s here, so 1,000 tokens take far longer than the 3 s
request deadline, and a second request waiting behind it (one running request per worker)
passes its 1 s queue deadline long before the first one ends."""

from __future__ import annotations

import threading

import httpx
import pytest

from integration.conftest import start_server, wait_until

CHAT = "/v1/chat/completions"
LONG = {
    "messages": [{"role": "user", "content": "Count to a thousand."}],
    "max_tokens": 1000,
    "ignore_eos": True,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(
        tmp_path_factory,
        "deadlines",
        [
            "--kv-cache-memory",
            "256MiB",
            "--max-model-len",
            "2048",
            "--request-timeout",
            "3",
            "--queue-timeout",
            "1",
            "--limit-worker-concurrency",
            "1",
        ],  # fmt: skip
        env={"MODEL_PATH": "/data/model"},
    )
    yield s
    s.stop()


def test_request_and_queue_deadlines(server):
    first = {}

    def long_request():
        first["r"] = httpx.post(server.url + CHAT, json=LONG, timeout=120)

    t = threading.Thread(target=long_request)
    t.start()
    assert wait_until(lambda: server.stats()["kv_blocks_used"] > 0)  # it runs
    queued = httpx.post(server.url + CHAT, json={**LONG, "max_tokens": 4}, timeout=60)
    assert queued.status_code == 429
    assert queued.json()["error"]["code"] == "queue_timeout"
    assert "retry-after" in queued.headers
    t.join(timeout=120)
    r = first["r"]
    assert r.status_code == 200
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "timeout"
    assert 0 < body["usage"]["completion_tokens"] < LONG["max_tokens"]
    assert body["choices"][0]["message"]["content"]  # the text so far
    assert wait_until(lambda: server.stats()["kv_blocks_used"] == 0)
    # and the server goes on serving
    ok = httpx.post(server.url + CHAT, json={**LONG, "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
