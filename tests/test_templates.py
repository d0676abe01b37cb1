"""Conversation templates against references transcribed from each family's own prompt code.

The test tokenizer is a byte-level BPE with no pre-tokenizer split, trained on the strings a
template would produce if it glued segments together ("user\\n\\n", "system\\n", ...): encoding
such a string whole gives other ids than encoding its parts, so the references below, which
encode exactly the pieces the official code encodes, catch a template that joins them.
"""

from __future__ import annotations

import functools

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from launcher.embedded import ensure_embedded_model
from router.templates import KNOWN_NAMES, TEMPLATES, ChatTemplate, TemplateError

LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
LLAMA2_SPECIALS = ("<s>", "</s>")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
GLM_SPECIALS = ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
ALL_SPECIALS = LLAMA3_SPECIALS + LLAMA2_SPECIALS + QWEN_SPECIALS + GLM_SPECIALS

# Strings a template would encode whole if it skipped the official segmenting.
_GLUED = [
    "user\n\n",
    "system\n\n",
    "assistant\n\n",
    "user\n",
    "system\n",
    "assistant\n",
    "\nHello there",
    "\n\nHello there",
    "\nYou are a helpful assistant.",
    "\nBe brief.",
    "\n\nBe brief.",
    "Be brief.\n\n",
    "Hi ",
    " Hi",
    "[INST] Hello [/INST] Hi ",
    "\n你好",
]


@functools.cache
def _tokenizer(specials: tuple[str, ...] = ALL_SPECIALS, chat_template: str | None = None):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(_GLUED, trainer)
    backend.add_special_tokens(list(specials))
    kw = {"eos_token": "</s>"} if "</s>" in specials else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **kw)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def smol():
    return AutoTokenizer.from_pretrained(ensure_embedded_model())


SYSTEM = "Be brief."
TURNS = [
    {"role": "user", "content": " Hello there \n"},
    {"role": "assistant", "content": "Hi"},
    {"role": "user", "content": "你好"},
]
WITH_SYSTEM = [{"role": "system", "content": SYSTEM}, *TURNS]


def _enc(tok, s: str) -> list[int]:
    return tok.encode(s, add_special_tokens=False)


def _id(tok, token: str) -> int:
    token_id = tok.convert_tokens_to_ids(token)
    assert isinstance(token_id, int), token
    return token_id


def _render(name: str, messages: list[dict], tok=None) -> list[int]:
    return ChatTemplate.create(name, tok or _tokenizer()).render(messages)


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
