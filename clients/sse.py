"""What chat and bench share of the wire: the server's base URL, OpenAI-style server-sent
events and error bodies. Text in, values out; no requests are made here."""

from __future__ import annotations

import json

import httpx

DONE = "[DONE]"


def base_url(url: str, flag: str) -> str:
    """The server root from `url`, which may also be the OpenAI SDK's base URL (ending /v1);
    a ValueError naming `flag` when it is no http(s) URL."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise ValueError(f"{flag} {url!r} is not a URL: {e}") from e
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{flag} {url!r} must be an http:// or https:// URL with a host")
    return url.rstrip("/").removesuffix("/v1")


def parse_sse_line(line: str) -> dict | str | None:
    """One line of the stream: its decoded `data:` payload, DONE, or None for anything else
    (blank separators, comments, `event:`/`id:` fields)."""
    if not line.startswith("data:"):
        return None
    payload = line[len("data:") :].strip()
    if payload == DONE:
        return DONE
    try:
        body = json.loads(payload)
    except json.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def error_message(status: int, raw: bytes | str) -> str:
    """The server's own words for a failure: `error.message` of an OpenAI error body when there
    is one, else the raw body, prefixed with the HTTP status."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        err = body.get("error", body.get("detail"))
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return f"HTTP {status}: {err['message']}"
        if isinstance(err, str):
            return f"HTTP {status}: {err}"
    return f"HTTP {status}: {text.strip()[:500] or '(empty body)'}"


def delta_text(event: dict) -> str:
    """The text a chat chunk adds; "" for role-only, usage-only or `null`-content chunks."""
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    delta = choices[0].get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


def event_error(event: dict) -> str | None:
    """A stream that fails after its 200 carries `{"error": {...}}` as a data event."""
    err = event.get("error")
    if err is None:
        return None
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err)
