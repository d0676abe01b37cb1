"""Qwen (v1, `QWenLMHeadModel`): the Qwen2 block under other names, loaded without the
checkpoint's own modeling code.

Layout of the official checkpoints: `transformer.wte`, per layer `ln_1`, `attn.c_attn` (Q, K and
V fused, with bias), `attn.c_proj`, `ln_2`, `mlp.w1` / `mlp.w2` / `mlp.c_proj`, then
`transformer.ln_f` and an untied `lm_head`. The MLP computes `w1(x) * silu(w2(x))`, so `w2` is
the gate and `w1` the up projection. Its config fields are mapped in `qwen_config.py`.
"""

from __future__ import annotations

from layers.linear import Split
from shards.models.base import WeightRule
from shards.models.qwen2 import Qwen2ForCausalLM

_L = "model.layers.{i}."
_H = "transformer.h.{i}."


class QWenLMHeadModel(Qwen2ForCausalLM):
    def weight_rules(self) -> dict[str, WeightRule]:
        r = {
            "transformer.wte.weight": WeightRule("model.embed_tokens.weight", Split.VOCAB),
            "transformer.ln_f.weight": WeightRule("model.norm.weight", Split.REPLICATED),
            "lm_head.weight": WeightRule("lm_head.weight", Split.VOCAB),
            f"{_H}ln_1.weight": WeightRule(f"{_L}input_layernorm.weight", Split.REPLICATED),
            f"{_H}ln_2.weight": WeightRule(
                f"{_L}post_attention_layernorm.weight", Split.REPLICATED
            ),
            f"{_H}attn.c_proj.weight": WeightRule(f"{_L}self_attn.o_proj.weight", Split.ROW),
            f"{_H}mlp.w2.weight": WeightRule(f"{_L}mlp.gate_up_proj.weight", Split.COLUMN, "gate"),
            f"{_H}mlp.w1.weight": WeightRule(f"{_L}mlp.gate_up_proj.weight", Split.COLUMN, "up"),
            f"{_H}mlp.c_proj.weight": WeightRule(f"{_L}mlp.down_proj.weight", Split.ROW),
        }
        for p in ("weight", "bias"):
            r[f"{_H}attn.c_attn.{p}"] = WeightRule(
                f"{_L}self_attn.qkv_proj.{p}", Split.COLUMN, fused=("q", "k", "v")
            )
        return r

    def skipped_weights(self) -> tuple[str, ...]:
        return (f"{_H}attn.rotary_emb.inv_freq",)
