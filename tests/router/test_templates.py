"""Conversation templates: stop tokens, start-up errors, the tokenizer's own template, and the
probe that compares a named template with it."""

from __future__ import annotations

import pytest

from router.http.templates import KNOWN_NAMES, TEMPLATES, ChatTemplate, TemplateError
from tests.support.templates import (  # noqa: F401
    ALL_SPECIALS,
    GLM_SPECIALS,
    LLAMA2_SPECIALS,
    LLAMA3_SPECIALS,
    QWEN_SPECIALS,
    SYSTEM,
    TURNS,
    WITH_SYSTEM,
    _enc,
    _id,
    _render,
    _tokenizer,
)

# -- stop tokens -----------------------------------------------------------------------------

MODEL_EOS = 7  # an id the templates know nothing about

EXPECTED_STOPS = {
    "llama-3": ("<|eot_id|>", "<|end_of_text|>"),
    "llama-2": ("</s>",),
    "qwen-7b-chat": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    "baichuan-chat": (195,),
    "baichuan2-chat": (195,),
    "chatglm3": ("<|user|>", "<|observation|>"),
    "chatglm2": (),
    "generate": (),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_STOPS))
def test_stop_token_ids_are_template_stops_plus_model_eos(name):
    tok = _tokenizer()
    t = ChatTemplate.create(name, tok, eos_token_ids=(MODEL_EOS,))
    expected = {s if isinstance(s, int) else _id(tok, s) for s in EXPECTED_STOPS[name]}
    assert set(t.stop_token_ids) == expected | {MODEL_EOS}
    assert len(t.stop_token_ids) == len(set(t.stop_token_ids))


def test_every_named_template_has_an_expected_stop_set():
    assert set(EXPECTED_STOPS) == set(TEMPLATES)


def test_model_eos_ids_are_kept_in_order_without_duplicates():
    tok = _tokenizer()
    eot = _id(tok, "<|eot_id|>")
    t = ChatTemplate.create("llama-3", tok, eos_token_ids=(eot, MODEL_EOS))
    assert t.stop_token_ids[:2] == (eot, MODEL_EOS)
    assert t.stop_token_ids.count(eot) == 1


def test_tokenizer_template_stops_on_model_eos(smol):
    assert ChatTemplate.create(None, smol, eos_token_ids=(2,)).stop_token_ids == (2,)


# -- errors ----------------------------------------------------------------------------------


def test_known_names_are_the_vendor_table():
    assert set(KNOWN_NAMES) == {
        "generate",
        "shennong_chat",
        "llama-3",
        "llama-2",
        "qwen-7b-chat",
        "baichuan2-chat",
        "baichuan-chat",
        "chatglm3",
        "chatglm2",
    }


def test_unknown_template_name_lists_known_names():
    with pytest.raises(TemplateError, match="llama-4") as e:
        ChatTemplate.create("llama-4", _tokenizer())
    for name in KNOWN_NAMES:
        assert name in str(e.value)


@pytest.mark.parametrize(
    "name, missing",
    [
        ("llama-3", "<|eot_id|>"),
        ("llama-3", "<|begin_of_text|>"),
        ("llama-3", "<|end_of_text|>"),  # needed only as a stop token
        ("llama-2", "</s>"),
        ("qwen-7b-chat", "<|im_start|>"),
        ("qwen-7b-chat", "<|endoftext|>"),
        ("chatglm3", "<|observation|>"),
        ("chatglm3", "<|user|>"),
        ("chatglm2", "[gMASK]"),
        ("chatglm2", "sop"),
    ],
)
def test_missing_special_token_fails_at_create_naming_it(name, missing):
    tok = _tokenizer(tuple(s for s in ALL_SPECIALS if s != missing))
    with pytest.raises(TemplateError) as e:
        ChatTemplate.create(name, tok)
    assert repr(missing) in str(e.value) and name in str(e.value)


def test_special_token_that_maps_to_unk_counts_as_missing(smol):
    # SmolLM2 answers unknown tokens with its unk id (<|endoftext|>) instead of None.
    with pytest.raises(TemplateError, match=r"'\[gMASK\]'"):
        ChatTemplate.create("chatglm2", smol)


def test_no_name_without_tokenizer_template_is_an_error():
    with pytest.raises(TemplateError, match="CONV_TEMPLATE"):
        ChatTemplate.create(None, _tokenizer())


def test_shennong_chat_without_tokenizer_template_is_an_error():
    with pytest.raises(TemplateError, match="shennong_chat"):
        ChatTemplate.create("shennong_chat", _tokenizer())


# -- the tokenizer's own template, and no template -------------------------------------------


def _smol_reference(smol, messages):
    text = smol.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return _enc(smol, text)


@pytest.mark.parametrize("messages", [TURNS, WITH_SYSTEM])
def test_no_name_uses_tokenizer_chat_template(smol, messages):
    assert ChatTemplate.create(None, smol).render(messages) == _smol_reference(smol, messages)


def test_shennong_chat_uses_tokenizer_chat_template(smol):
    t = ChatTemplate.create("shennong_chat", smol)
    assert t.render(WITH_SYSTEM) == _smol_reference(smol, WITH_SYSTEM)


def test_generate_renders_the_plain_content(smol):
    t = ChatTemplate.create("generate", smol)
    assert t.render([{"role": "user", "content": "Once upon a time"}]) == _enc(
        smol, "Once upon a time"
    )


def test_generate_adds_no_roles_or_special_tokens(smol):
    text = smol.decode(ChatTemplate.create("generate", smol).render(WITH_SYSTEM))
    assert text == "\n".join(m["content"] for m in WITH_SYSTEM)


# -- probe against the tokenizer's own template ----------------------------------------------


def test_probe_agrees_when_named_template_matches_tokenizer(smol):
    # SmolLM2's template is chatml, the same text qwen-7b-chat renders once a system is given.
    assert ChatTemplate.create("qwen-7b-chat", smol).probe_mismatch() is None


def test_probe_reports_a_different_rendering():
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}<|im_start|>assistant\n"
    )
    tok = _tokenizer(ALL_SPECIALS, chatml)
    assert "llama-2" in (ChatTemplate.create("llama-2", tok).probe_mismatch() or "")
