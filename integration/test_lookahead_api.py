"""Lookahead through the API: with USE_LOOKAHEAD=1 the server answers greedy requests exactly as
the plain server does (text, stops, usage, streaming), and reports its drafts in usage."""

from __future__ import annotations

import httpx
import pytest

from integration.conftest import start_server
from integration.sse import chat_stream_text, stream_events

DOC = (
    "The lighthouse at Point Reyes was built in 1870. Its first-order Fresnel lens has 1,032 "
    "glass prisms and was made in France. Keepers climbed 308 steps to reach it each night. "
    "In 1975 the Coast Guard replaced it with an automated light and opened it to visitors."
)
QUESTION = f"{DOC}\n\nRepeat the text above word for word."


@pytest.fixture(scope="module")
def lookahead_server(tmp_path_factory):
    server = start_server(
        tmp_path_factory,
        "lookahead",
        ["--kv-cache-memory", "512MiB"],
        env={"MODEL_PATH": "/data/model", "USE_LOOKAHEAD": "1", "NUM_SPECULATIVE_TOKENS": "6"},
    )
    yield server
    server.stop()


def _chat(server, **kw) -> dict:
    body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, **kw}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_lookahead_answers_as_plain_decoding_and_reports_drafts(lookahead_server, embedded_server):
    plain = _chat(embedded_server, max_tokens=48)
    ahead = _chat(lookahead_server, max_tokens=48)
    assert ahead["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert ahead["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    drafts = ahead["usage"]["completion_tokens_details"]
    assert drafts["accepted_prediction_tokens"] > 5  # the answer quotes the prompt
    assert "completion_tokens_details" not in plain["usage"]
    stats = httpx.get(f"{lookahead_server.url}/stats", timeout=30).json()
    assert stats["draft_tokens_accepted"] >= drafts["accepted_prediction_tokens"]


def test_a_stop_string_inside_accepted_drafts_ends_where_plain_decoding_ends(
    lookahead_server, embedded_server
):
    text = _chat(embedded_server, max_tokens=48)["choices"][0]["message"]["content"]
    stop = text[len(text) // 2 : len(text) // 2 + 6]
    plain = _chat(embedded_server, max_tokens=48, stop=[stop])
    ahead = _chat(lookahead_server, max_tokens=48, stop=[stop])
    assert ahead["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert ahead["choices"][0]["finish_reason"] == "stop"
    assert ahead["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]


def test_streamed_lookahead_text_equals_the_whole_answer(lookahead_server):
    whole = _chat(lookahead_server, max_tokens=40)["choices"][0]["message"]["content"]
    body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
            "max_tokens": 40, "stream": True}  # fmt: skip
    text, reason = chat_stream_text(
        stream_events(f"{lookahead_server.url}/v1/chat/completions", body)
    )
    assert text == whole and reason == "length"
