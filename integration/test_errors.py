"""Bad input gets a clear 4xx JSON error, loses nothing, and the server keeps answering."""

from __future__ import annotations

import httpx
import pytest

MSG = [{"role": "user", "content": "hi"}]

BAD_CHAT_BODIES = {
    "not json": b"{not json",
    "truncated json": b'{"messages": [',
    "json array": b"[1, 2]",
    "json string": b'"hello"',
    "empty body": b"",
    "no messages": {"temperature": 0},
    "messages not a list": {"messages": "hi"},
    "empty messages": {"messages": []},
    "message without role": {"messages": [{"content": "hi"}]},
    "bad role": {"messages": [{"role": "wizard", "content": "hi"}]},
    "content a number": {"messages": [{"role": "user", "content": 5}]},
    "user message without content": {"messages": [{"role": "user"}]},
    "last message from assistant": {"messages": [{"role": "assistant", "content": "hi"}]},
    "temperature a string": {"messages": MSG, "temperature": "0.5"},
    "temperature too high": {"messages": MSG, "temperature": 2.5},
    "temperature negative": {"messages": MSG, "temperature": -0.1},
    "top_p zero": {"messages": MSG, "top_p": 0},
    "top_p above one": {"messages": MSG, "top_p": 1.5},
    "top_k below -1": {"messages": MSG, "top_k": -5},
    "top_k a float": {"messages": MSG, "top_k": 2.5},
    "presence_penalty out of range": {"messages": MSG, "presence_penalty": 3},
    "frequency_penalty out of range": {"messages": MSG, "frequency_penalty": -2.5},
    "repetition_penalty below one": {"messages": MSG, "repetition_penalty": 0.5},
    "max_tokens zero": {"messages": MSG, "max_tokens": 0},
    "max_tokens negative": {"messages": MSG, "max_tokens": -3},
    "max_tokens a string": {"messages": MSG, "max_tokens": "10"},
    "max_tokens past the context": {"messages": MSG, "max_tokens": 10**6},
    "stream not a bool": {"messages": MSG, "stream": "yes"},
    "stop a number": {"messages": MSG, "stop": 5},
    "stop empty string": {"messages": MSG, "stop": [""]},
    "n of two": {"messages": MSG, "n": 2},
    "seed a string": {"messages": MSG, "seed": "abc"},
    "ignore_eos a string": {"messages": MSG, "ignore_eos": "true"},
    "top_logprobs too many": {"messages": MSG, "logprobs": True, "top_logprobs": 50},
    "prompt past the context": {"messages": [{"role": "user", "content": "word " * 2000}]},
}


@pytest.mark.parametrize("case", sorted(BAD_CHAT_BODIES))
@pytest.mark.parametrize("stream", [False, True])
def test_bad_chat_body_is_a_4xx_json_error(tiny_server, case, stream):
    body = BAD_CHAT_BODIES[case]
    if isinstance(body, dict):
        r = httpx.post(
            f"{tiny_server.url}/v1/chat/completions",
            json={**body, "stream": stream} if "stream" not in body else body,
            timeout=60,
        )
    else:
        r = httpx.post(
            f"{tiny_server.url}/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json"},
            timeout=60,
        )
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["message"] and error["type"]


BAD_COMPLETION_BODIES = {
    "no prompt": {"max_tokens": 3},
    "empty prompt": {"prompt": ""},
    "empty prompt list": {"prompt": []},
    "prompt a number": {"prompt": 5},
    "negative token id": {"prompt": [-1, 5]},
    "token id past the vocabulary": {"prompt": [10**7]},
    "mixed prompt list": {"prompt": ["a", 5]},
}


@pytest.mark.parametrize("case", sorted(BAD_COMPLETION_BODIES))
def test_bad_completion_body_is_a_4xx_json_error(tiny_server, case):
    r = httpx.post(
        f"{tiny_server.url}/v1/completions", json=BAD_COMPLETION_BODIES[case], timeout=60
    )
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.json()["error"]["message"]


def test_unknown_route_and_wrong_method_are_json_errors(tiny_server):
    r = httpx.get(f"{tiny_server.url}/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and r.json()["error"]
    r = httpx.get(f"{tiny_server.url}/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]


def test_oversized_body_is_413(tiny_server):
    r = httpx.post(
        f"{tiny_server.url}/v1/chat/completions",
        timeout=60,
        content=b'{"messages": [{"role": "user", "content": "' + b"a" * (17 * 2**20) + b'"}]}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]


def test_server_still_answers_after_bad_input(tiny_server):
    for body in list(BAD_CHAT_BODIES.values())[:10]:
        kw = {"json": body} if isinstance(body, dict) else {"content": body}
        httpx.post(f"{tiny_server.url}/v1/chat/completions", timeout=60, **kw)
    form = {"messages": "hi"}  # what `curl -d` without -H sends: a form
    httpx.post(f"{tiny_server.url}/v1/chat/completions", timeout=60, data=form)
    r = httpx.post(
        f"{tiny_server.url}/v1/chat/completions",
        timeout=60,
        json={"messages": MSG, "max_tokens": 3, "temperature": 0},
    )
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] >= 1
    assert tiny_server.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize(
    "messages, index",
    [
        ([{"role": "user"}], 0),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": None}], 1),
        ([{"role": "system"}, {"role": "user", "content": "hi"}], 0),
        ([{"role": "user", "content": "hi"}, {"role": "assistant"}, MSG[0]], 1),
    ],
)
def test_a_message_without_content_names_its_index(tiny_server, messages, index):
    r = httpx.post(
        f"{tiny_server.url}/v1/chat/completions", json={"messages": messages}, timeout=60
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == f"messages[{index}].content", error
    assert error["type"] == "invalid_request_error" and "content" in error["message"]


def test_an_assistant_message_with_tool_calls_may_omit_content(tiny_server):
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [MSG[0], {"role": "assistant", "tool_calls": [call]}, MSG[0]]
    body = {"messages": messages, "max_tokens": 2, "temperature": 0}
    r = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
     "multipart/form-data; boundary=x"],
)  # fmt: skip
def test_a_body_sent_as_another_type_than_json_is_refused(tiny_server, content_type):
    """What a page on another origin can make a browser send without a CORS preflight."""
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(
            f"{tiny_server.url}{path}",
            content=body,
            headers={"content-type": content_type},
            timeout=60,
        )
        assert r.status_code == 415, r.text
        error = r.json()["error"]
        assert error["code"] == "unsupported_media_type"
        assert "Content-Type: application/json" in error["message"]


@pytest.mark.parametrize("headers", [{}, {"content-type": "application/json; charset=utf-8"}])
def test_a_json_body_without_or_with_a_charset_is_served(tiny_server, headers):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    r = httpx.post(
        f"{tiny_server.url}/v1/chat/completions", content=body, headers=headers, timeout=60
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
