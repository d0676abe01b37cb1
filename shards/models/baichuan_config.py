"""Baichuan's config.json fields (the model: baichuan.py), read by shards/model_config.py."""

from __future__ import annotations


def common_fields(raw: dict, source: str) -> dict:
    """Baichuan's 13B models (both generations) position tokens by ALiBi biases, its 7B models by
    rotary embeddings, and the configs say which by the context key each model's code reads: the
    7B code `max_position_embeddings` (Baichuan2-7B's config carries it beside
    `model_max_length`), the 13B code `model_max_length` alone. Baichuan-7B's own architecture
    name is rotary whatever it carries; a config with neither key falls back to the width (4,096
    rotary, any other ALiBi: vLLM's rule, right for the official sizes only)."""
    out = dict(raw)
    archs = raw.get("architectures") or []
    if archs and archs[0] == "BaiChuanForCausalLM":
        alibi, why = False, "the architecture is Baichuan-7B's"
    elif "max_position_embeddings" in raw:
        alibi, why = False, "the config carries max_position_embeddings, as the 7B models' do"
    elif "model_max_length" in raw:
        alibi, why = True, "the config carries model_max_length only, as the 13B models' do"
    else:
        alibi = raw.get("hidden_size") != 4096
        why = f"the config names no context length; hidden size {raw.get('hidden_size')}"
    out["alibi"] = alibi
    out["_notes"] = [f"Baichuan positions: {'ALiBi' if alibi else 'rotary'} ({why})"]
    out.setdefault("max_position_embeddings", raw.get("model_max_length", 4096))
    return out
