"""Baichuan / Baichuan2, 7B and 13B (`BaiChuanForCausalLM`, `BaichuanForCausalLM`): the Llama
block with Q, K and V fused in one `W_pack` tensor, loaded without the checkpoint's own code.
The 13B models position tokens by ALiBi attention biases instead of rotary embeddings
(`ModelConfig.alibi`, layers/attention/alibi.py); their layout is otherwise the 7B one.

Baichuan2's LM head is a `NormHead`: its rows are scaled to unit length before the matmul. The
checkpoint stores them unscaled, so they are normalized once after loading. Baichuan2 is told
apart by its vocabulary (125,696 tokens), as its config names no other difference.
"""

from __future__ import annotations

from layers.linear import Split
from shards.models.base import WeightRule
from shards.models.llama import LlamaForCausalLM

BAICHUAN2_VOCAB = 125696
_L = "model.layers.{i}."


class BaichuanForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg, bc) -> None:
        super().__init__(cfg, bc)
        self.lm_head.normalize_rows = cfg.vocab_size == BAICHUAN2_VOCAB

    def weight_rules(self) -> dict[str, WeightRule]:
        r = super().weight_rules()
        for slot in "qkv":
            del r[f"{_L}self_attn.{slot}_proj.weight"]
        r[f"{_L}self_attn.W_pack.weight"] = WeightRule(
            f"{_L}self_attn.qkv_proj.weight", Split.COLUMN, fused=("q", "k", "v")
        )
        return r
