"""Which conversation template serves a model: the one named (CONV_TEMPLATE or
ti_model_config.json), else the tokenizer's own chat template, else the official format of the
model's family read off its checkpoint (Qwen, Baichuan and ChatGLM tokenizers carry no chat
template: the families format chats in their remote code), else none, and chat requests are
refused while completions are served. Reads config files only; never the model's code."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

BAICHUAN2_VOCAB = 125696  # as shards/models/baichuan.py tells Baichuan2 apart (its NormHead)


@dataclass(frozen=True)
class TemplateChoice:
    name: str | None  # a template name, "tokenizer" for its own, None: no chat format known
    reason: str


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _has_special(tokenizer, token: str) -> bool:
    token_id = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    return isinstance(token_id, int) and (token_id != unk or token == tokenizer.unk_token)


def _names(folder: Path, config: dict) -> str:
    """What the checkpoint calls itself, lower-cased: its folder and the names its config and
    tokenizer config were saved under (Llama-2 chat folders say "chat" nowhere else)."""
    tok_config = _read_json(folder / "tokenizer_config.json")
    parts = (folder.resolve().name, config.get("_name_or_path"), tok_config.get("name_or_path"))
    return " ".join(str(p).lower() for p in parts if p)


def _family(folder: Path, tokenizer) -> TemplateChoice:
    config = _read_json(folder / "config.json")
    archs = config.get("architectures") or [""]
    arch = archs[0] if isinstance(archs, list) and archs else ""
    if arch == "QWenLMHeadModel":
        chat_format = _read_json(folder / "generation_config.json").get("chat_format", "chatml")
        if chat_format != "chatml":
            return TemplateChoice(None, f"a Qwen model whose chat_format is {chat_format!r}")
        return TemplateChoice("qwen-7b-chat", "Qwen's chat format (chatml), from QWenLMHeadModel")
    if config.get("model_type") == "baichuan":
        if config.get("vocab_size") == BAICHUAN2_VOCAB:
            return TemplateChoice(
                "baichuan2-chat", f"Baichuan2's chat format ({BAICHUAN2_VOCAB}-token vocabulary)"
            )
        if arch == "BaichuanForCausalLM":
            return TemplateChoice(
                "baichuan-chat", "Baichuan-13B's chat format (BaichuanForCausalLM, 64K vocabulary)"
            )
        return TemplateChoice(None, "Baichuan-7B, a base model")
    if config.get("model_type") == "chatglm":
        if _has_special(tokenizer, "<|user|>"):
            return TemplateChoice("chatglm3", "ChatGLM3's format (the tokenizer has <|user|>)")
        return TemplateChoice("chatglm2", "ChatGLM2's format (no <|user|> token)")
    names = _names(folder, config)
    if (
        arch == "LlamaForCausalLM"
        and re.search(r"llama[-_ ]?2", names)
        and "chat" in names
        and _has_special(tokenizer, "</s>")
    ):
        return TemplateChoice("llama-2", "Llama-2's chat format (a llama-2 chat checkpoint)")
    return TemplateChoice(None, f"no chat format is known for {arch or 'this model'}")


def choose_template(name: str | None, tokenizer, model_path: str) -> TemplateChoice:
    if name is not None:
        return TemplateChoice(name, "named by CONV_TEMPLATE or ti_model_config.json")
    if getattr(tokenizer, "chat_template", None):
        return TemplateChoice("tokenizer", "the tokenizer's own chat template")
    return _family(Path(model_path), tokenizer)
