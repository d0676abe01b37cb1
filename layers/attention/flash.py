"""CUDA attention with flash-attn's varlen kernel reading the paged cache through block tables.

flash-attn is imported here only, when this backend is selected. Its paged mode needs a KV block
size that is a multiple of 256 (`REQUIRED_BLOCK_MULTIPLE`); the shard picks its block size from it.
"""

from __future__ import annotations

import importlib.util

import torch

from layers.attention.backend import AttentionBackend, KVCache, write_kv
from layers.attention.metadata import AttentionMetadata

REQUIRED_BLOCK_MULTIPLE = 256


def flash_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


class FlashAttentionBackend(AttentionBackend):
    name = "flash-attn"

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func

        self._varlen = flash_attn_varlen_func

    def _tensors(self, meta: AttentionMetadata, device):
        if "flash" not in meta.cache:
            layout = meta.layout
            q_lens = torch.tensor([0, *layout.query_lens], dtype=torch.int32, device=device)
            k_lens = torch.tensor([0, *layout.seq_lens], dtype=torch.int32, device=device)
            max_blocks = max(len(t) for t in layout.block_tables)
            tables = [t + [0] * (max_blocks - len(t)) for t in layout.block_tables]
            meta.cache["flash"] = (
                q_lens.cumsum(0, dtype=torch.int32),
                k_lens.cumsum(0, dtype=torch.int32),
                max(layout.query_lens),
                max(layout.seq_lens),
                torch.tensor(tables, dtype=torch.int32, device=device),
            )
        return meta.cache["flash"]

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
        assert kv_cache[0].shape[1] % REQUIRED_BLOCK_MULTIPLE == 0, "flash-attn paged block size"
        write_kv(kv_cache, k, v, meta.slot_mapping)
        cu_q, cu_k, max_q, max_k, tables = self._tensors(meta, q.device)
        # causal=True aligns the query block to the end of the keys (cached prefix + new tokens).
        window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
        return self._varlen(
            q,
            kv_cache[0],
            kv_cache[1],
            cu_q,
            cu_k,
            max_q,
            max_k,
            softmax_scale=scale,
            causal=True,
            window_size=window,
            alibi_slopes=alibi_slopes,  # float32 [heads]: slope x (key - query position) added
            block_table=tables,
        )
