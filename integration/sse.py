"""Read server-sent events the way a strict client does."""

from __future__ import annotations

import json

import httpx


def stream_events(url: str, body: dict, headers: dict | None = None, timeout: float = 300) -> list:
    """POST with stream=true; returns the decoded `data:` payloads, "[DONE]" as a string."""
    events = []
    with httpx.stream("POST", url, json=body, headers=headers, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def chat_stream_text(events: list) -> tuple[str, str]:
    """(content, finish_reason) from chat chunks, asserting the OpenAI chunk contract."""
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e.get("choices")]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert len(reasons) == 1, reasons
    assert chunks[-1]["choices"][0]["finish_reason"] == reasons[0]
    text = ""
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        delta = c["choices"][0]["delta"]
        if "content" in delta:
            assert isinstance(delta["content"], str)
            text += delta["content"]
    return text, reasons[0]
