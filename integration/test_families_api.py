"""Each family the spec's templates name, served from a tiny checkpoint in its official layout
with no template setting (Llama-3's, whose tokenizers carry their own, named): the family's
format is chosen from the checkpoint and logged, the chat prompt is the template's rendering,
the template's stop token ends generation, and a special token the model emits never shows in
the text. A model with no known chat format serves completions and refuses chats.

The checkpoints are built to answer predictably: the residual stream's first dimension is +10
for every token but a trigger token and the special one (-10), no layer writes to it, and the
LM head reads only that dimension, +1 for the stop token and -1 for the special one. So after
any ordinary token the model emits the stop token, and after the trigger it emits the special
token again and again.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest
import torch

from integration.conftest import start_server
from shards.models.baichuan import BAICHUAN2_VOCAB
from tests.support.families import as_baichuan, as_chatglm, as_qwen_v1
from tests.support.templates import ALL_SPECIALS, GLM_SPECIALS, _tokenizer
from tests.support.tiny import build_hf_model, save_checkpoint, tiny_config

VOCAB = 1100  # above the test tokenizer's ~1,016 tokens and Baichuan's reserved ids 195/196
SPECIAL = "[gMASK]"  # a special token that is no template's stop token
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi"},
    {"role": "user", "content": "你好"},
]

# template -> (reference architecture, how to write the official layout, the stop token)
FAMILIES = {
    "qwen-7b-chat": ("qwen2", "qwen", "<|im_end|>"),
    # Baichuan2-7B's layout; 195 is an ordinary token here: its text must not show
    "baichuan2-chat": ("llama", "baichuan", 195),
    "baichuan-chat": ("llama", "baichuan-13b", 195),  # the 13B layout: ALiBi, no rotary
    "chatglm3": ("glm", "chatglm", "<|observation|>"),
    "chatglm2": ("glm", "chatglm", "</s>"),  # no stop token of its own: the config's EOS
    "llama-3": ("llama", "llama", "<|eot_id|>"),
    "llama-2": ("llama", "llama", "</s>"),
}
# Named at start-up: the official Llama-3 tokenizers carry this format as their chat template.
NAMED = {"llama-3"}
# How each checkpoint differs from the others where the choice reads it.
VOCABS = {"baichuan2-chat": BAICHUAN2_VOCAB}
FOLDER_NAMES = {"llama-2": "Llama-2-7b-chat-hf"}
TOKENIZER_SPECIALS = {"chatglm2": tuple(s for s in ALL_SPECIALS if s not in GLM_SPECIALS[2:])}


def _token_id(tok, token: str | int) -> int:
    return token if isinstance(token, int) else tok.convert_tokens_to_ids(token)


def _steer(hf, stop_id: int, special_id: int, trigger_id: int) -> None:
    with torch.no_grad():
        sd = hf.state_dict()
        emb = sd["model.embed_tokens.weight"]
        emb[:, 0] = 10.0
        emb[[trigger_id, special_id], 0] = -10.0
        for name, w in sd.items():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                w[0, :] = 0.0  # no layer writes the first dimension
        sd["model.norm.weight"].zero_()
        sd["model.norm.weight"][0] = 1.0
        head = sd["lm_head.weight"]
        head.zero_()
        head[stop_id, 0], head[special_id, 0] = 1.0, -1.0


def _family_folder(root: Path, template: str) -> tuple[Path, dict]:
    arch, layout, stop = FAMILIES[template]
    tok = _tokenizer(TOKENIZER_SPECIALS.get(template, ALL_SPECIALS))
    ids = {
        "stop": _token_id(tok, stop),
        "special": _token_id(tok, SPECIAL),
        "trigger": tok.encode("Hi", add_special_tokens=False)[-1],
        "eos": _token_id(tok, "</s>"),
    }
    extra = {"num_key_value_heads": 4} if layout in ("qwen", "baichuan", "baichuan-13b") else {}
    if arch == "glm":
        extra.update(head_dim=16, attention_bias=True)
    vocab = VOCABS.get(template, VOCAB)
    cfg = tiny_config(arch, vocab_size=vocab, eos_token_id=ids["eos"], **extra)
    hf = build_hf_model(cfg)
    _steer(hf, ids["stop"], ids["special"], ids["trigger"])
    folder = root / FOLDER_NAMES.get(template, template)
    if layout == "qwen":
        as_qwen_v1(hf, folder)
    elif layout.startswith("baichuan"):
        alibi = layout == "baichuan-13b"
        as_baichuan(hf, folder, hf.lm_head.weight.detach(), alibi=alibi)
    elif layout == "chatglm":
        as_chatglm(hf, folder, eos_token_id=ids["eos"])
    else:
        save_checkpoint(hf, folder)
    tok.save_pretrained(folder)
    return folder, ids


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    folder, ids = _family_folder(tmp_path_factory.mktemp("families"), request.param)
    server = start_server(
        tmp_path_factory,
        f"family-{request.param}",
        ["--model-path", str(folder), "--kv-cache-memory", "32MiB"],
        env={"CONV_TEMPLATE": request.param} if request.param in NAMED else {},
    )
    yield request.param, folder, ids, server
    server.stop()


def test_the_familys_format_is_chosen_from_the_checkpoint_and_logged(family):
    template, _, _, server = family
    line = f"conversation template {template}: "
    assert line in server.logs()
    reason = server.logs().split(line, 1)[1].splitlines()[0]
    assert ("CONV_TEMPLATE" in reason) == (template in NAMED), reason


def test_chat_renders_the_template_and_stops_on_its_stop_token(family):
    from transformers import AutoTokenizer

    from router.http.templates import ChatTemplate

    template, folder, ids, server = family
    rendered = ChatTemplate.create(template, AutoTokenizer.from_pretrained(folder), (ids["eos"],))
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 8, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(rendered.render(MESSAGES))
    assert ids["stop"] in rendered.stop_token_ids
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == ""


def test_a_special_token_never_shows_in_the_text(family):
    _, _, ids, server = family
    for stream in (False, True):
        body = {"prompt": [5, 9, ids["trigger"]], "max_tokens": 4, "temperature": 0}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        if stream:
            chunks = [line[6:] for line in r.text.splitlines() if line.startswith("data: {")]
            events = [orjson.loads(c) for c in chunks]
            choices = [c for e in events for c in e["choices"]]
            text = "".join(c["text"] for c in choices)
            finish = [c["finish_reason"] for c in choices if c["finish_reason"]]
            tokens = events[-1]["usage"]["completion_tokens"]
        else:
            choice = r.json()["choices"][0]
            text, finish, tokens = choice["text"], [choice["finish_reason"]], 4
            assert r.json()["usage"]["completion_tokens"] == 4
        assert text == "" and SPECIAL not in text
        assert finish == ["length"] and tokens == 4


def test_a_model_without_a_chat_format_serves_completions_and_refuses_chats(tmp_path_factory):
    hf = build_hf_model(tiny_config("llama", vocab_size=VOCAB, num_key_value_heads=4))
    folder = tmp_path_factory.mktemp("base") / "Baichuan-7B"
    as_baichuan(hf, folder, hf.lm_head.weight.detach())  # a base model, no chat variant
    _tokenizer().save_pretrained(folder)
    server = start_server(
        tmp_path_factory, "base", ["--model-path", str(folder), "--kv-cache-memory", "32MiB"]
    )
    try:
        logs = server.logs()
        assert "no conversation template: Baichuan-7B, a base model" in logs
        assert "Baichuan positions: rotary (the architecture is Baichuan-7B's)" in logs
        for stream in (False, True):
            r = httpx.post(
                f"{server.url}/v1/chat/completions",
                json={"messages": MESSAGES, "max_tokens": 4, "stream": stream},
                timeout=60,
            )
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "no_chat_template" and error["param"] == "messages"
            assert "CONV_TEMPLATE" in error["message"] and "baichuan-chat" in error["message"]
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": "Hello there", "max_tokens": 4, "temperature": 0, "ignore_eos": True},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        server.stop()
