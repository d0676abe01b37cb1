"""The attention backend interface and the `Attention` layer that calls it."""

from __future__ import annotations

import logging

import torch
from torch import nn

from layers.attention.metadata import AttentionMetadata

log = logging.getLogger("shardserve.attention")

KVCache = tuple[
    torch.Tensor, torch.Tensor
]  # each [num_blocks, block_size, local_kv_heads, head_dim]


class AttentionBackend:
    name = "abstract"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        alibi_slopes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [num_tokens, heads, head_dim]; k, v: [num_tokens, kv_heads, head_dim].
        Writes k, v into the cache at `meta.slot_mapping`, then attends each token to its
        sequence's cached and new keys (causally), with ALiBi biases when `alibi_slopes`
        ([heads], float32) is given. Returns [num_tokens, heads, head_dim]."""
        raise NotImplementedError


def write_kv(kv_cache: KVCache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    k_cache, v_cache = kv_cache
    if torch.compiler.is_compiling():
        # Inside a compiled graph a write through a view of the cache makes inductor copy the
        # whole cache; indexing the cache itself is written in place.
        block_size = k_cache.shape[1]
        where = (slots // block_size, slots % block_size)
        k_cache.index_put_(where, k)
        v_cache.index_put_(where, v)
        return
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def select_backend(
    device: torch.device, dtype: torch.dtype, prefer_flash: bool = True
) -> AttentionBackend:
    from layers.attention.torch_sdpa import TorchSDPABackend

    if device.type != "cuda" or not prefer_flash:
        return TorchSDPABackend()
    # flash-attn kernels exist for half precision only.
    if dtype not in (torch.float16, torch.bfloat16):
        log.info("attention on %s: torch SDPA (flash-attn has no %s kernels)", device, dtype)
        return TorchSDPABackend()
    from layers.attention.flash import FlashAttentionBackend, flash_available

    if flash_available():
        return FlashAttentionBackend()
    log.info("attention on %s: torch SDPA (flash-attn is not installed)", device)
    return TorchSDPABackend()


class Attention(nn.Module):
    """One layer's attention over its paged KV cache; projections and rotary live in the model."""

    def __init__(
        self,
        local_num_heads: int,
        local_num_kv_heads: int,
        head_dim: int,
        scale: float,
        backend: AttentionBackend,
        sliding_window: int | None = None,
        alibi_slopes: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.local_num_heads = local_num_heads
        self.local_num_kv_heads = local_num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend
        self.sliding_window = sliding_window
        # A buffer, so a compiled step reads it as a graph input (layers/attention/alibi.py)
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)

    def forward(self, q, k, v, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        # q: [num_tokens, local_num_heads, head_dim]; k, v: [num_tokens, local_num_kv_heads,
        # head_dim] -> [num_tokens, local_num_heads * head_dim]
        out = self.backend.forward(
            q, k, v, kv_cache, meta, self.scale, self.sliding_window, self.alibi_slopes
        )
        return out.reshape(q.shape[0], self.local_num_heads * self.head_dim)
