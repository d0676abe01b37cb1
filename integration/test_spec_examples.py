"""The vendor manual's own examples, verbatim, against the embedded default model."""

from __future__ import annotations

import json
import subprocess

import pytest

from integration.sse import chat_stream_text


def _curl(url: str, body: str) -> str:
    return subprocess.run(
        ["curl", "-sN", "-H", "content-type: application/json", url, "-d", body],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout


def test_curl_example_answers(embedded_server):
    out = _curl(
        f"{embedded_server.url}/v1/chat/completions",
        '{"messages":[{"role": "user", "content": "hello"}], "temperature": 0.0}',
    )
    body = json.loads(out)
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"].strip()
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_curl_stream_example_is_well_formed_sse(embedded_server):
    out = _curl(
        f"{embedded_server.url}/v1/chat/completions",
        '{"messages":[{"role": "user", "content": "hello"}], "temperature": 0.0, "stream": true}',
    )
    assert out.endswith("data: [DONE]\n\n")
    events = [e[len("data: ") :] for e in out.split("\n\n") if e]
    parsed = [e if e == "[DONE]" else json.loads(e) for e in events]
    text, reason = chat_stream_text(parsed)
    assert text.strip() and reason in ("stop", "length")


@pytest.fixture()
def sdk_env(embedded_server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", f"{embedded_server.url}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")


def test_openai_sdk_example(sdk_env):
    from openai import OpenAI

    client = OpenAI()
    completion = client.chat.completions.create(
        model="model",
        messages=[{"role": "user", "content": "Hello"}],
        temperature=0.7,
        top_p=1.0,
        max_tokens=128,
    )
    assert completion.choices[0].message.content
    stream = client.chat.completions.create(
        model="model",
        messages=[{"role": "user", "content": "Hello"}],
        temperature=0.7,
        top_p=1.0,
        max_tokens=128,
        stream=True,
    )
    pieces = []
    for chunk in stream:
        if not chunk.choices or not chunk.choices[0].delta.content:
            continue
        pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces)


def test_openai_sdk_async_stream_matches_sync(sdk_env):
    import asyncio

    from openai import AsyncOpenAI, OpenAI

    messages = [{"role": "user", "content": "Name a color."}]
    sync = OpenAI().chat.completions.create(
        model="model", messages=messages, temperature=0, max_tokens=24
    )

    async def run() -> str:
        client = AsyncOpenAI()
        stream = await client.chat.completions.create(
            model="model",
            messages=messages,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        assert usage is not None and usage.completion_tokens == sync.usage.completion_tokens
        return text

    assert asyncio.run(run()) == sync.choices[0].message.content


def test_models_endpoint_reports_context(embedded_server):
    from openai import OpenAI

    models = OpenAI(base_url=f"{embedded_server.url}/v1", api_key="x").models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]
    assert models.data[0].model_extra["max_model_len"] == 8192
