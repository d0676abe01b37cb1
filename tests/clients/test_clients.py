"""The clients without a server: percentiles, SSE parsing, prompts, and the chat loop over an
in-process httpx transport (null deltas, HTTP errors, how a session ends)."""

from __future__ import annotations

import json
import random

import httpx
import numpy as np
import pytest

from clients import chat
from clients.bench import BenchConfig
from clients.report import percentile
from clients.sse import DONE, delta_text, error_message, parse_sse_line
from clients.workload import build_prompts


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy_linear(n):
    rng = random.Random(n)
    values = [rng.uniform(0, 50) for _ in range(n)]
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_no_values_is_none_and_q_is_checked():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0], 50) == 2.0
    with pytest.raises(ValueError, match="101"):
        percentile([1.0], 101)


def test_sse_lines_give_payloads_done_or_nothing():
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert parse_sse_line('data:{"a": 1}') == {"a": 1}
    assert parse_sse_line("data: [DONE]") == DONE
    for line in ("", ": keep-alive", "event: message", "data: not json", "data: [1]"):
        assert parse_sse_line(line) is None


def test_delta_text_skips_null_and_non_string_content():
    def chunk(delta):
        return {"choices": [{"index": 0, "delta": delta}]}

    assert delta_text(chunk({"content": "hi"})) == "hi"
    assert delta_text(chunk({"content": None})) == ""
    assert delta_text(chunk({"content": 5})) == ""
    assert delta_text(chunk({"role": "assistant"})) == ""
    assert delta_text({"choices": [], "usage": {"completion_tokens": 1}}) == ""
    assert delta_text({"choices": [{"delta": None}]}) == ""


def test_error_message_prefers_the_servers_own_words():
    body = json.dumps({"error": {"message": "max_tokens too large", "type": "x"}})
    assert error_message(400, body.encode()) == "HTTP 400: max_tokens too large"
    assert error_message(502, b"<html>bad gateway</html>") == "HTTP 502: <html>bad gateway</html>"


def _sse(*events) -> bytes:
    return b"".join(
        f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events
    )


def _delta(content) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": content}]}


class _Session:
    """Feeds `lines` to chat.main as the user and records what it writes and sends."""

    def __init__(self, handler, lines) -> None:
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.out: list[str] = []
        self._lines = list(lines)

        def record(request: httpx.Request) -> httpx.Response:
            self.bodies.append(json.loads(request.content))
            self.auth.append(request.headers.get("authorization"))
            return handler(len(self.bodies), request)

        self.client = httpx.Client(transport=httpx.MockTransport(record))

    def read(self, prompt: str) -> str:
        self.out.append(prompt)
        if not self._lines:
            raise EOFError
        line = self._lines.pop(0)
        if isinstance(line, BaseException):
            raise line
        return line

    def run(self, *argv: str) -> int:
        return chat.main(list(argv), read=self.read, write=self.out.append, client=self.client)


def test_chat_survives_null_deltas_and_http_errors_and_drops_failed_turns():
    def handler(n: int, request: httpx.Request) -> httpx.Response:
        if n == 1:
            return httpx.Response(500, json={"error": {"message": "boom", "type": "server"}})
        stream = _sse(
            _delta({"role": "assistant", "content": ""}),
            _delta({"content": None}),
            _delta({"content": "Hel"}),
            _delta({"content": "lo"}),
            _delta({}),
            DONE,
        )
        return httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})

    s = _Session(handler, ["first", "second", "third", "/quit"])
    assert s.run("--system", "be brief", "--token", "sk-1") == 0
    text = "".join(s.out)
    assert "error: HTTP 500: boom" in text
    assert "Assistant: Hello\n" in text
    assert s.bodies[2]["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "third"},
    ]
    assert all(b["stream"] is True and b["max_tokens"] == 512 for b in s.bodies)
    assert s.auth == ["Bearer sk-1"] * 3


def test_chat_reports_a_stream_cut_before_done():
    def handler(n: int, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_sse(_delta({"content": "par"})))

    s = _Session(handler, ["hi", "/exit"])
    assert s.run() == 0
    assert "error: the stream ended before [DONE]" in "".join(s.out)


@pytest.mark.parametrize(
    "lines, status", [([], 0), (["  /exit  "], 0), ([KeyboardInterrupt()], 130)]
)
def test_chat_ends_cleanly_on_eof_exit_and_ctrl_c(lines, status):
    s = _Session(lambda n, r: httpx.Response(500), lines)
    assert s.run() == status
    assert s.bodies == []


def test_prompts_are_distinct_reproducible_and_near_the_asked_length():
    prompts = build_prompts(20, 200, 0, seed=3)
    assert len(set(prompts)) == 20
    assert prompts == build_prompts(20, 200, 0, seed=3)
    assert prompts != build_prompts(20, 200, 0, seed=4)
    # Words and full stops are about a token each.
    sizes = [len(p.split()) + p.count(".") for p in prompts]
    assert all(180 <= n <= 220 for n in sizes), sizes
    rag = build_prompts(2, 1, 1000, seed=0)
    assert all("Question: quote records" in p and "Record 40:" in p for p in rag)


def test_bench_config_names_the_bad_flag():
    with pytest.raises(ValueError, match="--concurrency"):
        BenchConfig(concurrency=0)
    with pytest.raises(ValueError, match="--url"):
        BenchConfig(url="localhost:8501")
    assert BenchConfig(url="http://h:1/v1/").base_url == "http://h:1"
