"""Llama 2/3, Mistral and SmolLM2: pre-norm decoder, GQA attention with rotary, SwiGLU MLP.

Mistral's sliding window is honoured by the attention mask (per layer, from the config).
"""

from __future__ import annotations

import torch
from torch import nn

from layers.activation import SiluAndMul
from layers.attention.alibi import local_slopes
from layers.attention.backend import Attention, KVCache
from layers.attention.metadata import AttentionMetadata
from layers.embedding import ParallelLMHead, VocabParallelEmbedding
from layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, Split
from layers.norm import RMSNorm
from layers.rotary import RotaryEmbedding
from shards.model_config import ModelConfig
from shards.models.base import BuildContext, WeightRule, call_layer

_L = "model.layers.{i}."


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, bc: BuildContext, qkv_bias: bool) -> None:
        super().__init__()
        kw = dict(pctx=bc.pctx, dtype=bc.dtype, device=bc.device)
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            bias=qkv_bias,
            quant=bc.quant(),
            **kw,
        )
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * cfg.head_dim,
            cfg.hidden_size,
            bias=cfg.attention_bias,
            quant=bc.quant(),
            **kw,
        )
        self.alibi = cfg.alibi  # no rotary: ALiBi biases in attention position the tokens
        slopes = None
        if cfg.alibi:
            local = self.qkv_proj.local_num_heads
            slopes = local_slopes(cfg.num_attention_heads, bc.pctx.rank, local, bc.device)
        self.attn = Attention(
            self.qkv_proj.local_num_heads,
            self.qkv_proj.local_num_kv_heads,
            cfg.head_dim,
            scale=cfg.head_dim**-0.5,
            backend=bc.backend,
            sliding_window=cfg.sliding_windows[layer_idx],
            alibi_slopes=slopes,
        )

    def forward(self, rope, cos, sin, h, kv_cache: KVCache, meta: AttentionMetadata):
        t = h.shape[0]
        qkv = self.qkv_proj(h).view(t, -1, self.head_dim)  # [t, heads + 2 * kv_heads, head_dim]
        num_q = self.qkv_proj.local_num_heads
        num_kv = self.qkv_proj.local_num_kv_heads
        qk = qkv[:, : num_q + num_kv]
        if not self.alibi:
            qk = rope.rotate(qk, cos, sin)  # q and k rotate as one tensor
        q, k, v = qk[:, :num_q], qk[:, num_q:], qkv[:, num_q + num_kv :]
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, bc: BuildContext) -> None:
        super().__init__()
        kw = dict(bias=cfg.mlp_bias, pctx=bc.pctx, dtype=bc.dtype, device=bc.device)
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size,
            {"gate": cfg.intermediate_size, "up": cfg.intermediate_size},
            quant=bc.quant(),
            **kw,
        )
        self.down_proj = RowParallelLinear(
            cfg.intermediate_size, cfg.hidden_size, quant=bc.quant(), **kw
        )
        self.act = SiluAndMul()

    def forward(self, h):
        return self.down_proj(self.act(self.gate_up_proj(h)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, bc: BuildContext, qkv_bias: bool) -> None:
        super().__init__()
        kw = dict(eps=cfg.rms_norm_eps, dtype=bc.dtype, device=bc.device)
        self.self_attn = LlamaAttention(cfg, layer_idx, bc, qkv_bias)
        self.mlp = LlamaMLP(cfg, bc)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **kw)

    def forward(self, rope, cos, sin, h, residual, kv_cache, meta):
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(rope, cos, sin, h, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, bc: BuildContext, qkv_bias: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, pctx=bc.pctx, dtype=bc.dtype, device=bc.device
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, bc, qkv_bias) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=bc.dtype, device=bc.device)
        self.rotary_emb = RotaryEmbedding(
            cfg.head_dim,
            cfg.rotary_dim,
            bc.max_position,
            cfg.rope_theta,
            cfg.rope_scaling,
            cfg.max_position_embeddings,
            interleaved=cfg.rope_interleaved,
            device=bc.device,
        )

    def forward(
        self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata, layer_step
    ):
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb.cos_sin(positions, meta.seq_lens_per_token, h.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer_step(layer, self.rotary_emb, cos, sin, h, residual, kv_cache, meta)
        h, _ = self.norm(h, residual)
        return h


class LlamaForCausalLM(nn.Module):
    qkv_bias = False

    def __init__(self, cfg: ModelConfig, bc: BuildContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg, bc, self.qkv_bias or cfg.attention_bias)
        self.lm_head = ParallelLMHead(
            cfg.vocab_size,
            cfg.hidden_size,
            pctx=bc.pctx,
            dtype=bc.dtype,
            device=bc.device,
            fast=bc.fast_kernels,
            quant=bc.quant(),
        )
        if cfg.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    @property
    def needs_seq_lens(self) -> bool:
        return self.model.rotary_emb.needs_seq_lens

    def forward(self, input_ids, positions, kv_caches, meta, layer_step=call_layer) -> torch.Tensor:
        # [num_tokens] -> [num_tokens, hidden_size]. `layer_step` runs one decoder layer: a
        # compiled decode step passes its compiled one (shards/compiled_decode.py).
        return self.model(input_ids, positions, kv_caches, meta, layer_step)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [num_rows, hidden_size] -> [num_rows, vocab_size]
        return self.lm_head(hidden)

    def weight_rules(self) -> dict[str, WeightRule]:
        r = {
            "model.embed_tokens.weight": WeightRule("model.embed_tokens.weight", Split.VOCAB),
            "model.norm.weight": WeightRule("model.norm.weight", Split.REPLICATED),
        }
        for slot in "qkv":
            r[f"{_L}self_attn.{slot}_proj.weight"] = WeightRule(
                f"{_L}self_attn.qkv_proj.weight", Split.COLUMN, slot
            )
            if self.qkv_bias or self.cfg.attention_bias:
                r[f"{_L}self_attn.{slot}_proj.bias"] = WeightRule(
                    f"{_L}self_attn.qkv_proj.bias", Split.COLUMN, slot
                )
        r[f"{_L}self_attn.o_proj.weight"] = WeightRule(f"{_L}self_attn.o_proj.weight", Split.ROW)
        if self.cfg.attention_bias:
            r[f"{_L}self_attn.o_proj.bias"] = WeightRule(f"{_L}self_attn.o_proj.bias", Split.ROW)
        for slot in ("gate", "up"):
            for p in ("weight", "bias") if self.cfg.mlp_bias else ("weight",):
                r[f"{_L}mlp.{slot}_proj.{p}"] = WeightRule(
                    f"{_L}mlp.gate_up_proj.{p}", Split.COLUMN, slot
                )
        for p in ("weight", "bias") if self.cfg.mlp_bias else ("weight",):
            r[f"{_L}mlp.down_proj.{p}"] = WeightRule(f"{_L}mlp.down_proj.{p}", Split.ROW)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            r[f"{_L}{norm}.weight"] = WeightRule(f"{_L}{norm}.weight", Split.REPLICATED)
        if not self.cfg.tie_word_embeddings:
            r["lm_head.weight"] = WeightRule("lm_head.weight", Split.VOCAB)
        return r

    def skipped_weights(self) -> tuple[str, ...]:
        skip = (f"{_L}self_attn.rotary_emb.inv_freq",)
        # A tied checkpoint may still store the head; the embedding is the one we keep.
        return skip + (("lm_head.weight",) if self.cfg.tie_word_embeddings else ())
