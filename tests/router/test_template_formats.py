"""Conversation templates against references transcribed from each family's own prompt code.

The test tokenizer is a byte-level BPE with no pre-tokenizer split, trained on the strings a
template would produce if it glued segments together ("user\\n\\n", "system\\n", ...): encoding
such a string whole gives other ids than encoding its parts, so the references below, which
encode exactly the pieces the official code encodes, catch a template that joins them.
"""

from __future__ import annotations

import pytest

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


def test_test_tokenizer_distinguishes_glued_from_segmented():
    tok = _tokenizer()
    for whole, parts in [
        ("user\n\n", ["user", "\n\n"]),
        ("system\n", ["system", "\n"]),
        ("\nHello there", ["\n", "Hello there"]),
        ("\n\nBe brief.", ["\n\n", "Be brief."]),
    ]:
        assert _enc(tok, whole) != sum((_enc(tok, p) for p in parts), [])
    # Baichuan's reserved role ids must be ordinary ids of this vocabulary.
    assert len(tok) > 196


# -- references ------------------------------------------------------------------------------
# Each follows the structure of the named function; `encode(x)` in the original is
# `_enc(tok, x)` here (none of those tokenizers adds BOS/EOS in the calls quoted).


def _ref_llama3(tok, dialog):
    """Meta llama3 `ChatFormat.encode_dialog_prompt` (llama/tokenizer.py)."""

    def encode_header(message):
        tokens = [_id(tok, "<|start_header_id|>")]
        tokens.extend(_enc(tok, message["role"]))
        tokens.append(_id(tok, "<|end_header_id|>"))
        tokens.extend(_enc(tok, "\n\n"))
        return tokens

    def encode_message(message):
        tokens = encode_header(message)
        tokens.extend(_enc(tok, message["content"].strip()))
        tokens.append(_id(tok, "<|eot_id|>"))
        return tokens

    tokens = [_id(tok, "<|begin_of_text|>")]
    for message in dialog:
        tokens.extend(encode_message(message))
    tokens.extend(encode_header({"role": "assistant", "content": ""}))
    return tokens


def _ref_llama2(tok, dialog):
    """Meta llama `Llama.chat_completion` (llama/generation.py)."""
    b_inst, e_inst = "[INST]", "[/INST]"
    b_sys, e_sys = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def encode(s, bos, eos):
        return [_id(tok, "<s>")] * bos + _enc(tok, s) + [_id(tok, "</s>")] * eos

    if dialog[0]["role"] == "system":
        dialog = [
            {
                "role": dialog[1]["role"],
                "content": b_sys + dialog[0]["content"] + e_sys + dialog[1]["content"],
            }
        ] + dialog[2:]
    dialog_tokens = sum(
        [
            encode(
                f"{b_inst} {(prompt['content']).strip()} {e_inst} {(answer['content']).strip()} ",
                bos=True,
                eos=True,
            )
            for prompt, answer in zip(dialog[::2], dialog[1::2])
        ],
        [],
    )
    assert dialog[-1]["role"] == "user"
    dialog_tokens += encode(f"{b_inst} {(dialog[-1]['content']).strip()} {e_inst}", True, False)
    return dialog_tokens


def _split(messages):
    """(system, [(query, response), ...], query): how the Qwen / ChatGLM2 APIs take a chat."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    history = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns) - 1, 2)]
    return system, history, turns[-1]["content"]


def _ref_qwen(tok, messages):
    """Qwen `qwen_generation_utils.make_context`, chat_format="chatml" (no window limit hit);
    `system` defaults to "You are a helpful assistant." as in Qwen's `chat()`."""
    system, history, query = _split(messages)
    system = "You are a helpful assistant." if system is None else system
    im_start_tokens = [_id(tok, "<|im_start|>")]
    im_end_tokens = [_id(tok, "<|im_end|>")]
    nl_tokens = _enc(tok, "\n")

    def _tokenize_str(role, content):
        return _enc(tok, role) + nl_tokens + _enc(tok, content)

    system_tokens = im_start_tokens + _tokenize_str("system", system) + im_end_tokens
    context_tokens = []
    for turn_query, turn_response in reversed(history):
        query_tokens = im_start_tokens + _tokenize_str("user", turn_query) + im_end_tokens
        response_tokens = (
            im_start_tokens + _tokenize_str("assistant", turn_response) + im_end_tokens
        )
        context_tokens = nl_tokens + query_tokens + nl_tokens + response_tokens + context_tokens
    context_tokens = system_tokens + context_tokens
    context_tokens += (
        nl_tokens
        + im_start_tokens
        + _tokenize_str("user", query)
        + im_end_tokens
        + nl_tokens
        + im_start_tokens
        + _enc(tok, "assistant")
        + nl_tokens
    )
    return context_tokens


def _ref_baichuan13b(tok, messages):
    """Baichuan-13B-Chat `_build_chat_input` (modeling_baichuan.py), no truncation."""
    user_token_id, assistant_token_id, eos_token_id = 195, 196, _id(tok, "</s>")
    total_input, round_input = [], []
    for message in messages[::-1]:
        content_tokens = _enc(tok, message["content"])
        if message["role"] == "user":
            round_input = [user_token_id] + content_tokens + round_input
            total_input = round_input + total_input
            round_input = []
        elif message["role"] == "assistant":
            round_input = [assistant_token_id] + content_tokens + [eos_token_id] + round_input
        else:
            raise ValueError(f"message role not supported yet: {message['role']}")
    total_input.append(assistant_token_id)
    return total_input


def _ref_baichuan2(tok, messages):
    """Baichuan2 `generation_utils.build_chat_input`, no truncation."""
    user_token_id, assistant_token_id = 195, 196

    def _parse_messages(messages, split_role="user"):
        system, rounds = "", []
        round = []
        for i, message in enumerate(messages):
            if message["role"] == "system":
                assert i == 0
                system = message["content"]
                continue
            if message["role"] == split_role and round:
                rounds.append(round)
                round = []
            round.append(message)
        if round:
            rounds.append(round)
        return system, rounds

    system, rounds = _parse_messages(messages, split_role="user")
    system_tokens = _enc(tok, system)
    history_tokens = []
    for round in rounds[::-1]:
        round_tokens = []
        for message in round:
            if message["role"] == "user":
                round_tokens.append(user_token_id)
            else:
                round_tokens.append(assistant_token_id)
            round_tokens.extend(_enc(tok, message["content"]))
        history_tokens = round_tokens + history_tokens
    input_tokens = system_tokens + history_tokens
    if messages[-1]["role"] != "assistant":
        input_tokens.append(assistant_token_id)
    return input_tokens


def _ref_chatglm2(tok, messages):
    """ChatGLM2-6B `build_prompt` (tokenization_chatglm.py), then `tokenizer([prompt])`, whose
    `build_inputs_with_special_tokens` puts [gMASK] sop in front. ChatGLM2 has no system role;
    a system message leads the prompt, followed by "\\n\\n" (FastChat's chatglm2 convention)."""
    system, history, query = _split(messages)
    prompt = ""
    for i, (old_query, response) in enumerate(history):
        prompt += f"[Round {i + 1}]\n\n问：{old_query}\n\n答：{response}\n\n"
    prompt += f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
    if system is not None:
        prompt = system + "\n\n" + prompt
    return [_id(tok, "[gMASK]"), _id(tok, "sop")] + _enc(tok, prompt)


def _ref_chatglm3(tok, messages):
    """ChatGLM3-6B `build_chat_input` (tokenization_chatglm.py), metadata "" throughout; the
    prefix [gMASK] sop comes from `batch_encode_plus(..., is_split_into_words=True)`."""

    def build_single_message(role, metadata, message):
        role_tokens = [_id(tok, f"<|{role}|>")] + _enc(tok, f"{metadata}\n")
        return role_tokens + _enc(tok, message)

    *history, last = messages
    input_ids = []
    for item in history:
        input_ids.extend(
            build_single_message(item["role"], item.get("metadata", ""), item["content"])
        )
    input_ids.extend(build_single_message("user", "", last["content"]))
    input_ids.extend([_id(tok, "<|assistant|>")])
    return [_id(tok, "[gMASK]"), _id(tok, "sop")] + input_ids


REFERENCES = {
    "llama-3": _ref_llama3,
    "llama-2": _ref_llama2,
    "qwen-7b-chat": _ref_qwen,
    "baichuan-chat": _ref_baichuan13b,
    "baichuan2-chat": _ref_baichuan2,
    "chatglm2": _ref_chatglm2,
    "chatglm3": _ref_chatglm3,
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_multi_turn_without_system_matches_reference(name):
    tok = _tokenizer()
    assert _render(name, TURNS) == REFERENCES[name](tok, TURNS)


@pytest.mark.parametrize("name", sorted(set(REFERENCES) - {"baichuan-chat"}))
def test_multi_turn_with_system_matches_reference(name):
    tok = _tokenizer()
    assert _render(name, WITH_SYSTEM) == REFERENCES[name](tok, WITH_SYSTEM)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_single_user_message_matches_reference(name):
    messages = [{"role": "user", "content": "Hello there"}]
    assert _render(name, messages) == REFERENCES[name](_tokenizer(), messages)


def test_baichuan13b_keeps_system_as_leading_text():
    # The official `_build_chat_input` raises on a system message; the template instead puts
    # the system text first, as Baichuan2 does, with the rest exactly the official rendering.
    tok = _tokenizer()
    with pytest.raises(ValueError, match="not supported"):
        _ref_baichuan13b(tok, WITH_SYSTEM)
    assert _render("baichuan-chat", WITH_SYSTEM) == _enc(tok, SYSTEM) + _ref_baichuan13b(tok, TURNS)


def test_baichuan13b_closes_each_assistant_turn_with_eos():
    tok = _tokenizer()
    ids = _render("baichuan-chat", TURNS)
    eos = _id(tok, "</s>")
    assert ids.count(eos) == 1 and ids[ids.index(eos) - len(_enc(tok, "Hi")) - 1] == 196


def test_llama2_has_one_bos_per_round():
    tok = _tokenizer()
    ids = _render("llama-2", WITH_SYSTEM)
    assert ids.count(_id(tok, "<s>")) == 2 and ids.count(_id(tok, "</s>")) == 1
    assert ids[0] == _id(tok, "<s>") and ids[-1] != _id(tok, "</s>")


def test_baichuan2_trailing_assistant_message_gets_no_assistant_token():
    messages = [*TURNS, {"role": "assistant", "content": "Hi"}]
    assert _render("baichuan2-chat", messages) == _ref_baichuan2(_tokenizer(), messages)
