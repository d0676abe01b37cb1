"""A named template (CONV_TEMPLATE) is what the server renders: prompt token counts over the
API equal the template's own rendering, and its stop ids end generation."""

from __future__ import annotations

import httpx
import pytest

from integration.conftest import start_server

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "What is 2+2?"},
]


@pytest.fixture(scope="module", params=["qwen-7b-chat", "generate", "baichuan2-chat"])
def templated(request, tmp_path_factory, tiny_folder):
    server = start_server(
        tmp_path_factory,
        f"template-{request.param}",
        ["--model-path", str(tiny_folder), "--kv-cache-memory", "32MiB"],
        env={"CONV_TEMPLATE": request.param},
    )
    yield request.param, server
    server.stop()


def test_prompt_tokens_equal_the_templates_rendering(templated, tiny_folder):
    from transformers import AutoTokenizer

    from router.http.templates import ChatTemplate

    name, server = templated
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    expected = ChatTemplate.create(name, tokenizer, (2,)).render(MESSAGES)
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 1, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(expected)


def test_a_template_unlike_the_tokenizers_own_is_warned_about_at_start(templated):
    name, server = templated
    warned = [line for line in server.logs().splitlines() if "check CONV_TEMPLATE" in line]
    if name == "baichuan2-chat":  # reserved ids 195/196, not SmolLM2's ChatML
        (line,) = warned
        assert "WARNING" in line and name in line and "differently" in line
    else:  # qwen-7b-chat renders ChatML as SmolLM2's own template does; generate is plain
        assert warned == []
