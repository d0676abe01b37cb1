"""Structured logs (`--log-format json`) and what logs never hold: API keys and prompt text."""

from __future__ import annotations

import json

import httpx
import pytest

from integration.conftest import start_server

KEY = "sk-logtest-6d1f0c"
MARKER = "zebra quokka 7741"  # in every prompt and bad body sent below
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def finished_log(tmp_path_factory, tiny_folder):
    """The whole log of a JSON-logging server with a key, after good and bad requests carrying
    MARKER, and a clean stop; and the ids of the requests that ran."""
    server = start_server(
        tmp_path_factory,
        "json-logs",
        ["--model-path", str(tiny_folder), "--kv-cache-memory", "32MiB", "--log-format", "json"],
        env={"OPENAI_API_KEYS": KEY},
    )
    ids = []
    try:
        url = server.url
        chat = {"messages": [{"role": "user", "content": MARKER}], "max_tokens": 4}
        r = httpx.post(url + CHAT, json=chat, headers=AUTH, timeout=60)
        assert r.status_code == 200
        ids.append(r.json()["id"])
        r = httpx.post(url + "/v1/completions", json={"prompt": MARKER, "max_tokens": 3,
                       "echo": True}, headers=AUTH, timeout=60)  # fmt: skip
        assert r.status_code == 200 and MARKER in r.json()["choices"][0]["text"]
        ids.append(r.json()["id"] + "-0")  # a completion's prompts are logged as <id>-<index>
        with httpx.stream("POST", url + CHAT, json={**chat, "max_tokens": 64, "stream": True},
                          headers=AUTH, timeout=60) as s:  # fmt: skip
            next(s.iter_lines())  # then the client goes away mid-stream
        bad = [
            (b'{"messages": [{"role": "user", "content": "' + MARKER.encode(), AUTH),
            (json.dumps({"messages": MARKER, "max_tokens": 2}).encode(), AUTH),
            (json.dumps({**chat, "temperature": -1, "model": MARKER}).encode(), AUTH),
            (json.dumps(chat).encode(), {"Authorization": f"Bearer {KEY}-{MARKER}"}),
        ]
        for body, headers in bad:
            r = httpx.post(url + CHAT, content=body, timeout=30,
                           headers={**headers, "content-type": "application/json"})  # fmt: skip
            assert r.status_code in (400, 401, 422)
    finally:
        assert server.stop() == 0
    return server.log_path.read_text(), ids


def test_every_line_is_a_json_event(finished_log):
    text, _ = finished_log
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) > 5
    for line in lines:
        event = json.loads(line)  # fails on any line that is not JSON (a stray print, a bar)
        assert {"time", "level", "logger", "message"} <= event.keys()


def test_a_finished_request_logs_its_account_as_fields(finished_log):
    text, ids = finished_log
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    finished = {e["request_id"]: e for e in events if e.get("event") == "finished"}
    for rid in ids:
        e = finished[rid]
        assert e["message"].startswith(rid)  # the request id first, in the text too
        assert e["finish_reason"] in ("stop", "length")
        assert e["prompt_tokens"] > 0 and 1 <= e["output_tokens"] <= 4
        assert 0 <= e["queue_s"] <= e["ttft_s"] <= e["total_s"]
    assert any(e.get("event") == "aborted" for e in events)


def test_keys_and_prompt_text_never_reach_the_logs(finished_log):
    text, _ = finished_log
    assert KEY not in text
    for word in MARKER.split():
        assert word not in text
