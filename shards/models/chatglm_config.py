"""ChatGLM2 / ChatGLM3's config.json fields (the model: chatglm.py), read by
shards/model_config.py."""

from __future__ import annotations

from shards.model_config import ModelConfigError, number


def common_fields(raw: dict, source: str) -> dict:
    """ChatGLM2 / ChatGLM3's config.json in the names the rest of this module reads. Rotary
    covers half of each head's dims, as neighbouring pairs, with base 10,000 x `rope_ratio`
    (ChatGLM3-32K); Q, K and V carry biases, the output projection does not. Variants of the
    block that no released ChatGLM2/3 checkpoint uses are refused by name."""
    for key, wanted in (
        ("rmsnorm", True),
        ("apply_residual_connection_post_layernorm", False),
        ("post_layer_norm", True),
        ("add_qkv_bias", True),
        ("add_bias_linear", False),
        ("original_rope", True),
    ):
        if bool(raw.get(key, wanted)) != wanted:
            raise ModelConfigError(f"{source}: ChatGLM with {key}={raw[key]!r} is not supported")
    out = dict(raw)
    heads = number(raw, "num_attention_heads", int, source)
    hidden = number(raw, "hidden_size", int, source)
    out["num_hidden_layers"] = number(raw, "num_layers", int, source)
    out["vocab_size"] = number(raw, "padded_vocab_size", int, source)
    out["intermediate_size"] = number(raw, "ffn_hidden_size", int, source)
    out["head_dim"] = number(raw, "kv_channels", int, source, hidden // heads)
    if raw.get("multi_query_attention"):
        out["num_key_value_heads"] = number(raw, "multi_query_group_num", int, source)
    else:
        out["num_key_value_heads"] = heads
    out["rms_norm_eps"] = number(raw, "layernorm_epsilon", float, source, 1e-5)
    out["max_position_embeddings"] = number(raw, "seq_length", int, source, 2048)
    out["rope_theta"] = 10000.0 * number(raw, "rope_ratio", float, source, 1.0)
    out["partial_rotary_factor"] = 0.5
    out["rope_interleaved"] = True
    out["tie_word_embeddings"] = False
    out["attention_bias"] = False  # the output projection's; Q, K and V always have one
    for key in ("rope_parameters", "rope_scaling"):
        out.pop(key, None)
    return out
