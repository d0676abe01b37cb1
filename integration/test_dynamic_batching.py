"""The DeepSpeed image's dynamic batching (`--scheduler dynamic-batching`) through the API."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from integration.conftest import start_server

PROMPTS = ["Say one word.", "Name a colour.", "Count to three.", "Greet me."]


def _complete(server, prompt: str) -> str:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_batches_of_two_give_the_continuous_servers_greedy_text(
    tmp_path_factory, tiny_folder, tiny_server
):
    expected = {p: _complete(tiny_server, p) for p in PROMPTS}
    args = ["--model-path", str(tiny_folder), "--kv-cache-memory", "64MiB",
            "--scheduler", "dynamic-batching", "--max-batch-size", "2"]  # fmt: skip
    server = start_server(tmp_path_factory, "dynamic", args, env={"BATCH_WAIT_TIMEOUT": "0.05"})
    try:
        assert "dynamic batching (up to 2 requests, 0.05s wait)" in server.logs()
        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # 4 at once: two batches of two
            got = dict(zip(PROMPTS, pool.map(lambda p: _complete(server, p), PROMPTS)))
        assert got == expected
        assert _complete(server, PROMPTS[0]) == expected[PROMPTS[0]]  # alone: after the wait
    finally:
        server.stop()
