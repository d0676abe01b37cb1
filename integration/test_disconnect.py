"""A client that goes away mid-request frees its KV blocks at once (seen through /stats)."""

from __future__ import annotations

import json
import socket

import httpx

from integration.conftest import wait_until

LONG = {
    "messages": [{"role": "user", "content": "go"}],
    "max_tokens": 400,
    "ignore_eos": True,
    "temperature": 0,
}


def test_stream_disconnect_frees_blocks(tiny_server):
    with httpx.stream(
        "POST", f"{tiny_server.url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=60
    ) as r:
        lines = r.iter_lines()
        for line in lines:
            if '"content"' in line and '"role"' not in line:
                break
        assert tiny_server.stats()["kv_blocks_used"] > 0
    # The connection is closed here, long before 400 tokens.
    assert wait_until(lambda: tiny_server.stats()["kv_blocks_used"] == 0)
    assert wait_until(lambda: tiny_server.stats()["active_requests"] == 0)


def test_non_stream_disconnect_frees_blocks(tiny_server):
    aborted_before = tiny_server.stats()["finished"].get("abort", 0)
    body = json.dumps({**LONG, "max_tokens": 480}).encode()
    sock = socket.create_connection(("127.0.0.1", tiny_server.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    assert wait_until(lambda: tiny_server.stats()["kv_blocks_used"] > 0)
    sock.close()
    assert wait_until(lambda: tiny_server.stats()["kv_blocks_used"] == 0)
    assert tiny_server.stats()["finished"].get("abort", 0) == aborted_before + 1
