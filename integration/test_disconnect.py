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


def test_200_streams_cut_at_random_points_return_every_block(tiny_server):
    """Streams closed after a random number of chunks (0: after the first line), some run
    to their end, 32 at a time: afterwards no block is held, and the server still answers."""
    import asyncio
    import random

    rng = random.Random(7)
    cuts = [rng.choice([0, 1, 2, 5, 10, 30, None]) for _ in range(200)]  # None: read it all
    url = f"{tiny_server.url}/v1/chat/completions"

    async def one(client, gate, cut):
        body = {**LONG, "stream": True, "max_tokens": rng.randrange(8, 64)}
        async with gate, client.stream("POST", url, json=body) as r:
            assert r.status_code == 200
            seen = 0
            async for _ in r.aiter_lines():
                seen += 1
                if cut is not None and seen > cut:
                    break  # leaving the block closes the connection mid-stream
            return cut is None or seen <= cut  # True when it ran to its end

    async def main():
        gate = asyncio.Semaphore(32)
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, gate, c) for c in cuts))

    completed = asyncio.run(main())
    assert 0 < sum(completed) < len(cuts)  # both kinds happened
    assert wait_until(lambda: tiny_server.stats()["kv_blocks_used"] == 0)
    assert wait_until(lambda: tiny_server.stats()["active_requests"] == 0)
    r = httpx.post(url, json={**LONG, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
