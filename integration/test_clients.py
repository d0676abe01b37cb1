"""`shardserve chat` and `shardserve bench` against the real tiny server: streamed multi-turn
chat (in process and as the CLI), bench counts and percentiles, RAG mode, failures reported."""

from __future__ import annotations

import asyncio
import json

import httpx

from clients import chat
from clients.bench import BenchConfig, run_bench
from integration.conftest import free_port
from launcher.cli import main as cli_main


def _chat_session(server, lines: list[str], *flags: str) -> tuple[int, list[str], list[dict]]:
    """Drives chat.main with `lines` as the user; returns (status, writes, request bodies)."""
    bodies: list[dict] = []
    out: list[str] = []
    pending = list(lines)

    def read(prompt: str) -> str:
        out.append(prompt)
        if not pending:
            raise EOFError
        return pending.pop(0)

    def record(request: httpx.Request) -> None:
        bodies.append(json.loads(request.content))

    with httpx.Client(timeout=120, event_hooks={"request": [record]}) as client:
        argv = ["--server", server.url, *flags]
        status = chat.main(argv, read=read, write=out.append, client=client)
    return status, out, bodies


def _replies(out: list[str]) -> list[list[str]]:
    """The pieces written for each reply, between "Assistant: " and its newline."""
    replies, current = [], None
    for piece in out:
        if piece == "Assistant: ":
            current = []
        elif piece == "\n" and current is not None:
            replies.append(current)
            current = None
        elif current is not None:
            current.append(piece)
    return replies


def test_chat_streams_two_turns_and_sends_the_first_reply_back(tiny_server):
    flags = ("--max-tokens", "12", "--temperature", "0")
    status, out, bodies = _chat_session(tiny_server, ["hi", "and then?", "/exit"], *flags)
    assert status == 0
    replies = _replies(out)
    assert len(replies) == 2 and len(bodies) == 2
    assert all(len(pieces) > 1 for pieces in replies), "each reply arrives in several chunks"
    first = "".join(replies[0])
    assert first.strip() and "".join(replies[1]).strip()
    assert bodies[1]["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "and then?"},
    ]


def test_chat_prints_the_servers_error_and_goes_on(tiny_server):
    status, out, bodies = _chat_session(tiny_server, ["hi", "again"], "--max-tokens", "100000")
    text = "".join(out)
    assert status == 0 and len(bodies) == 2
    assert text.count("error: HTTP 400: max_tokens=100000 exceeds") == 2
    # The failed turn is dropped, so the second request holds only the second question.
    assert bodies[1]["messages"] == [{"role": "user", "content": "again"}]


def test_bench_cli_gets_exact_token_counts_and_percentiles(tiny_server, tmp_path):
    path = tmp_path / "bench.json"
    argv = ["bench", "--url", tiny_server.url, "--concurrency", "4", "--requests", "8"]
    argv += ["--max-tokens", "16", "--prompt-tokens", "48", "--json", str(path)]
    assert cli_main(argv) == 0
    report = json.loads(path.read_text())
    assert report["requests"] == {"total": 8, "ok": 8, "failed": 0}
    assert report["errors"] == []
    assert report["output_tokens"] == 8 * 16
    assert report["usage_reported"] == 8 and report["short_outputs"] == 0
    models = httpx.get(f"{tiny_server.url}/v1/models", timeout=30).json()
    assert report["model"] == models["data"][0]["id"]
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        s = report[key]
        assert None not in (s["p50"], s["p90"], s["p99"]), key
        assert 0 < s["p50"] <= s["p90"] <= s["p99"], (key, s)
    # ITLs come from the content chunks after each request's first.
    assert report["itl_ms"]["count"] >= 8 * 10
    assert report["output_tokens_per_s"] > 0 and report["requests_per_s"] > 0


def test_bench_rag_mode_sends_long_documents(tiny_server):
    config = BenchConfig(
        url=tiny_server.url,
        concurrency=2,
        requests=2,
        max_tokens=8,
        rag_document_tokens=300,
        progress=False,
    )
    report = asyncio.run(run_bench(config))
    assert report["requests"]["ok"] == 2 and report["output_tokens"] == 16
    assert report["prompt_tokens_mean"] > 300


def test_bench_against_nothing_fails_every_request_and_exits_one(tmp_path):
    path = tmp_path / "bench.json"
    url = f"http://127.0.0.1:{free_port()}"
    argv = ["bench", "--url", url, "--requests", "3", "--concurrency", "2", "--json", str(path)]
    assert cli_main(argv) == 1
    report = json.loads(path.read_text())
    assert report["requests"] == {"total": 3, "ok": 0, "failed": 3}
    assert report["model"] == "model"
    assert report["errors"] and all("ConnectError" in e for e in report["errors"])
    assert report["ttft_ms"]["p50"] is None


def test_bench_reports_the_servers_error_message(tiny_server):
    config = BenchConfig(url=tiny_server.url, requests=2, max_tokens=100000, progress=False)
    report = asyncio.run(run_bench(config))
    assert report["requests"]["failed"] == 2
    assert "max_tokens=100000 exceeds" in report["errors"][0]
