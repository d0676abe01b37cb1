"""ChatGLM2 / ChatGLM3 (`ChatGLMModel`): the GLM block, loaded without the checkpoint's own code.

The block is the Qwen2 one (pre-norm RMSNorm, Q/K/V with biases, SwiGLU) with multi-query
attention (`multi_query_group_num` KV heads) and rotary on the first half of each head's dims
as neighbouring pairs; `chatglm_config.py` maps its config. Layout of the official
checkpoints: `transformer.embedding.word_embeddings`, per layer `input_layernorm`,
`self_attention.query_key_value` (Q, K and V fused by proportion, with bias),
`self_attention.dense`, `post_attention_layernorm`, `mlp.dense_h_to_4h` (gate and up fused),
`mlp.dense_4h_to_h`, then `transformer.encoder.final_layernorm` and an untied
`transformer.output_layer`.
"""

from __future__ import annotations

from layers.linear import Split
from shards.models.base import WeightRule
from shards.models.qwen2 import Qwen2ForCausalLM

_L = "model.layers.{i}."
_G = "transformer.encoder.layers.{i}."


class ChatGLMForConditionalGeneration(Qwen2ForCausalLM):
    def weight_rules(self) -> dict[str, WeightRule]:
        r = {
            "transformer.embedding.word_embeddings.weight": WeightRule(
                "model.embed_tokens.weight", Split.VOCAB
            ),
            "transformer.encoder.final_layernorm.weight": WeightRule(
                "model.norm.weight", Split.REPLICATED
            ),
            "transformer.output_layer.weight": WeightRule("lm_head.weight", Split.VOCAB),
            f"{_G}input_layernorm.weight": WeightRule(
                f"{_L}input_layernorm.weight", Split.REPLICATED
            ),
            f"{_G}post_attention_layernorm.weight": WeightRule(
                f"{_L}post_attention_layernorm.weight", Split.REPLICATED
            ),
            f"{_G}self_attention.dense.weight": WeightRule(
                f"{_L}self_attn.o_proj.weight", Split.ROW
            ),
            f"{_G}mlp.dense_h_to_4h.weight": WeightRule(
                f"{_L}mlp.gate_up_proj.weight", Split.COLUMN, fused=("gate", "up")
            ),
            f"{_G}mlp.dense_4h_to_h.weight": WeightRule(f"{_L}mlp.down_proj.weight", Split.ROW),
        }
        for p in ("weight", "bias"):
            r[f"{_G}self_attention.query_key_value.{p}"] = WeightRule(
                f"{_L}self_attn.qkv_proj.{p}", Split.COLUMN, fused=("q", "k", "v")
            )
        return r

    def skipped_weights(self) -> tuple[str, ...]:
        return ("transformer.rotary_pos_emb.inv_freq",)
