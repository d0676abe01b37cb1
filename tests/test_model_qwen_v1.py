"""Qwen v1 (`QWenLMHeadModel`) from its official checkpoint layout, without remote code: a tiny
random checkpoint written in that layout from a transformers Qwen2 model with the same weights
(Qwen v1's block is Qwen2's with fused QKV and other names) gives transformers' logits, and TP=2
gives TP=1's."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import save_file

from shards.model_config import load_model_config
from tests.tiny import build_hf_model, hf_logits, make_worker, our_logits, tiny_config
from tests.tp_helpers import tp_logits


def _as_qwen_v1(hf, folder):
    """Write `hf` (a transformers Qwen2 model without GQA) as an official Qwen v1 checkpoint."""
    c = hf.config
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
        "hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers, "intermediate_size": 2 * c.intermediate_size,
        "kv_channels": c.hidden_size // c.num_attention_heads,
        "layer_norm_epsilon": c.rms_norm_eps, "rotary_emb_base": 10000, "rotary_pct": 1.0,
        "max_position_embeddings": 4 * c.max_position_embeddings,
        "seq_length": c.max_position_embeddings, "use_dynamic_ntk": True, "use_logn_attn": True,
        "vocab_size": c.vocab_size, "no_bias": True, "auto_map": {"AutoModelForCausalLM": "x"},
    }))  # fmt: skip
    sd = hf.state_dict()
    out = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(c.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        att = src + "self_attn."
        out[dst + "ln_1.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "ln_2.weight"] = sd[src + "post_attention_layernorm.weight"]
        for p in ("weight", "bias"):
            out[dst + f"attn.c_attn.{p}"] = torch.cat([sd[f"{att}{s}_proj.{p}"] for s in "qkv"])
        out[dst + "attn.c_proj.weight"] = sd[att + "o_proj.weight"]
        out[dst + "mlp.w2.weight"] = sd[src + "mlp.gate_proj.weight"]  # w2 is the gate
        out[dst + "mlp.w1.weight"] = sd[src + "mlp.up_proj.weight"]
        out[dst + "mlp.c_proj.weight"] = sd[src + "mlp.down_proj.weight"]
    save_file(
        {k: v.contiguous().clone() for k, v in out.items()}, str(folder / "model.safetensors")
    )
    return folder


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    hf = build_hf_model(tiny_config("qwen2", num_key_value_heads=4, max_position_embeddings=128))
    return hf, _as_qwen_v1(hf, tmp_path_factory.mktemp("qwen") / "qwen-v1")


def _tokens(n: int) -> list[int]:
    rng = random.Random(5)
    return [rng.randrange(3, 160) for _ in range(n)]


def test_config_fields_map_and_the_context_stops_where_ntk_and_logn_begin(qwen):
    _, folder = qwen
    cfg = load_model_config(folder)
    assert cfg.architecture == "QWenLMHeadModel"
    assert cfg.intermediate_size == 128 and cfg.head_dim == 16 and cfg.num_key_value_heads == 4
    assert cfg.max_position_embeddings == 128  # seq_length, not the 512 the file also names
    assert not cfg.tie_word_embeddings and not cfg.attention_bias


def test_logits_match_transformers_qwen2_with_the_same_weights(qwen):
    hf, folder = qwen
    tokens = _tokens(20)
    ref = hf_logits(hf, tokens, 12)
    got = our_logits(make_worker(folder), tokens, 12, chunk=5)
    assert (got - ref).abs().max().item() <= 1e-4


def test_tp2_splits_the_fused_qkv_by_proportion(qwen):
    _, folder = qwen
    tokens = _tokens(16)
    ref = our_logits(make_worker(folder), tokens, 10)
    got = tp_logits(folder, 2, tokens, 10)
    assert (got - ref).abs().max().item() <= 1e-4
