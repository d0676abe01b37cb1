"""Qwen v1's config.json fields (the model: qwen.py), read by shards/model_config.py."""

from __future__ import annotations

from shards.model_config import number


def common_fields(raw: dict, source: str) -> dict:
    """Qwen v1's config.json in the names the rest of this module reads. Its `intermediate_size`
    counts both MLP halves. Dynamic NTK and logn attention scaling act only past `seq_length`
    tokens, so the context is capped there and both stay the identity."""
    out = dict(raw)
    heads = number(raw, "num_attention_heads", int, source)
    hidden = number(raw, "hidden_size", int, source)
    out["intermediate_size"] = number(raw, "intermediate_size", int, source) // 2
    out["head_dim"] = number(raw, "kv_channels", int, source, hidden // heads)
    out["rms_norm_eps"] = number(raw, "layer_norm_epsilon", float, source, 1e-6)
    out["rope_theta"] = number(raw, "rotary_emb_base", float, source, 10000.0)
    out["partial_rotary_factor"] = number(raw, "rotary_pct", float, source, 1.0)
    context = number(raw, "max_position_embeddings", int, source, 2048)
    if raw.get("use_dynamic_ntk") or raw.get("use_logn_attn"):
        context = number(raw, "seq_length", int, source, context)
    out["max_position_embeddings"] = context
    out["tie_word_embeddings"] = False
    for key in ("rope_parameters", "rope_scaling", "num_key_value_heads", "attention_bias"):
        out.pop(key, None)
    return out
