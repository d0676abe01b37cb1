"""Qwen2 / Qwen2.5: the Llama block with biases on the Q, K and V projections."""

from __future__ import annotations

from shards.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
