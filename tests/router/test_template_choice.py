"""The template a model gets with no CONV_TEMPLATE: the tokenizer's own, else its family's
official format read off the checkpoint, else none (chats refused naming CONV_TEMPLATE)."""

from __future__ import annotations

import json

import pytest

from router.http.template_choice import BAICHUAN2_VOCAB, choose_template
from router.http.templates import KNOWN_NAMES, ChatTemplate, NoChatFormat, TemplateError
from shards.models import baichuan
from tests.support.templates import ALL_SPECIALS, GLM_SPECIALS, _tokenizer

NO_GLM3 = tuple(s for s in ALL_SPECIALS if s not in GLM_SPECIALS[2:])  # [gMASK], sop only


def _folder(tmp_path, name: str = "model", generation: dict | None = None, **config):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def _choice(folder, tokenizer=None):
    return choose_template(None, tokenizer or _tokenizer(), str(folder))


def test_vocabulary_rule_agrees_with_the_model_code():
    assert BAICHUAN2_VOCAB == baichuan.BAICHUAN2_VOCAB


@pytest.mark.parametrize(
    "config, generation, expected",
    [
        ({"architectures": ["QWenLMHeadModel"], "model_type": "qwen"}, None, "qwen-7b-chat"),
        ({"architectures": ["QWenLMHeadModel"]}, {"chat_format": "chatml"}, "qwen-7b-chat"),
        ({"architectures": ["QWenLMHeadModel"]}, {"chat_format": "raw"}, None),
        ({"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
          "vocab_size": BAICHUAN2_VOCAB}, None, "baichuan2-chat"),
        ({"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
          "vocab_size": 64000}, None, "baichuan-chat"),
        ({"architectures": ["BaiChuanForCausalLM"], "model_type": "baichuan",
          "vocab_size": 64000}, None, None),  # Baichuan-7B: a base model
        ({"architectures": ["MistralForCausalLM"]}, None, None),
        ({}, None, None),
    ],
)  # fmt: skip
def test_family_format_from_the_checkpoint(tmp_path, config, generation, expected):
    choice = _choice(_folder(tmp_path, generation=generation, **config))
    assert choice.name == expected and choice.reason


def test_chatglm3_and_chatglm2_told_apart_by_the_tokenizer(tmp_path):
    folder = _folder(tmp_path, architectures=["ChatGLMModel"], model_type="chatglm")
    assert _choice(folder).name == "chatglm3"
    assert _choice(folder, _tokenizer(NO_GLM3)).name == "chatglm2"


@pytest.mark.parametrize(
    "folder_name, name_or_path, expected",
    [
        ("Llama-2-7b-chat-hf", None, "llama-2"),
        ("llama2_13b_chat", None, "llama-2"),
        ("model", "meta-llama/Llama-2-70b-chat-hf", "llama-2"),
        ("Llama-2-7b-hf", None, None),  # the base model
        ("vicuna-7b-chat", None, None),  # a Llama chat model of another format
    ],
)
def test_llama_2_chat_by_name(tmp_path, folder_name, name_or_path, expected):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    if name_or_path:
        config["_name_or_path"] = name_or_path
    assert _choice(_folder(tmp_path, folder_name, **config)).name == expected


def test_a_named_template_and_the_tokenizers_own_come_first(tmp_path):
    folder = _folder(tmp_path, architectures=["QWenLMHeadModel"])
    assert choose_template("chatglm3", _tokenizer(), str(folder)).name == "chatglm3"
    own = _tokenizer(chat_template="{{ messages[0]['content'] }}")
    assert choose_template(None, own, str(folder)).name == "tokenizer"


def test_without_format_refuses_chats_naming_conv_template():
    template = ChatTemplate.without_format(_tokenizer(), (7, 7, 9), "a base model")
    assert template.stop_token_ids == (7, 9)
    with pytest.raises(NoChatFormat) as e:
        template.render([{"role": "user", "content": "hi"}])
    message = str(e.value)
    assert "CONV_TEMPLATE" in message and "a base model" in message
    assert all(name in message for name in KNOWN_NAMES)


def test_a_tokenizer_template_that_raises_is_a_template_error():
    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
    template = ChatTemplate.create(None, _tokenizer(chat_template=strict))
    with pytest.raises(TemplateError, match="no system"):
        template.render([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
