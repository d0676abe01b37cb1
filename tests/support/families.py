"""Tiny checkpoints in the official layouts of the spec's model families, written from
transformers models with the same weights (the references the model tests compare against)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from shards.models.baichuan import BAICHUAN2_VOCAB

ROPE_RATIO = 2.0  # ChatGLM3-32K's longer-context base: 10,000 x rope_ratio


def _save(tensors: dict, folder) -> None:
    state = {k: v.contiguous().clone() for k, v in tensors.items()}
    save_file(state, str(folder / "model.safetensors"))


def as_qwen_v1(hf, folder):
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
    _save(out, folder)
    return folder


def as_baichuan(hf, folder, raw_head: torch.Tensor, alibi: bool = False):
    """A Baichuan layout as released: with `alibi` a 13B one (either generation: only
    `model_max_length`); else with Baichuan2's vocabulary Baichuan2-7B's (`BaichuanForCausalLM`,
    both context keys), otherwise Baichuan-7B's (`BaiChuanForCausalLM`). The hidden size is never
    7B's 4,096, so the position scheme is read off the config, not the width."""
    c = hf.config
    folder.mkdir(parents=True)
    assert c.hidden_size != 4096
    baichuan2 = c.vocab_size == BAICHUAN2_VOCAB
    arch = "BaichuanForCausalLM" if alibi or baichuan2 else "BaiChuanForCausalLM"
    context = {"model_max_length": 256}
    if baichuan2 and not alibi:
        context["max_position_embeddings"] = 256
    (folder / "config.json").write_text(json.dumps({
        "architectures": [arch], "model_type": "baichuan",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
        "rms_norm_eps": c.rms_norm_eps, "vocab_size": c.vocab_size, **context,
        "tie_word_embeddings": False, "hidden_act": "silu",
    }))  # fmt: skip
    sd = {k: v for k, v in hf.state_dict().items() if "rotary" not in k}
    for i in range(c.num_hidden_layers):
        att = f"model.layers.{i}.self_attn."
        sd[att + "W_pack.weight"] = torch.cat([sd.pop(f"{att}{s}_proj.weight") for s in "qkv"])
    sd["lm_head.weight"] = raw_head
    _save(sd, folder)
    return folder


def chatglm_config(c, **overrides) -> dict:
    out = {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "num_layers": c.num_hidden_layers, "padded_vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "ffn_hidden_size": c.intermediate_size,
        "kv_channels": c.head_dim, "num_attention_heads": c.num_attention_heads,
        "multi_query_attention": c.num_key_value_heads != c.num_attention_heads,
        "multi_query_group_num": c.num_key_value_heads, "seq_length": c.max_position_embeddings,
        "layernorm_epsilon": c.rms_norm_eps, "rmsnorm": True, "add_qkv_bias": True,
        "add_bias_linear": False, "apply_residual_connection_post_layernorm": False,
        "post_layer_norm": True, "original_rope": True, "rope_ratio": ROPE_RATIO,
        "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
        "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
    }  # fmt: skip
    out.update(overrides)
    return out


def as_chatglm(hf, folder, **config_overrides):
    """Write `hf` (a transformers Glm model) as an official ChatGLM2/3 checkpoint."""
    c = hf.config
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(chatglm_config(c, **config_overrides)))
    sd = hf.state_dict()
    out = {
        "transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
        "transformer.output_layer.weight": sd["lm_head.weight"],
        "transformer.rotary_pos_emb.inv_freq": torch.ones(c.head_dim // 4),
    }
    for i in range(c.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        att = src + "self_attn."
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "post_attention_layernorm.weight"]
        for p in ("weight", "bias"):
            qkv = torch.cat([sd[f"{att}{s}_proj.{p}"] for s in "qkv"])
            out[dst + f"self_attention.query_key_value.{p}"] = qkv
        out[dst + "self_attention.dense.weight"] = sd[att + "o_proj.weight"]
        out[dst + "mlp.dense_h_to_4h.weight"] = sd[src + "mlp.gate_up_proj.weight"]
        out[dst + "mlp.dense_4h_to_h.weight"] = sd[src + "mlp.down_proj.weight"]
    _save(out, folder)
    return folder
