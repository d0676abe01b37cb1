"""Attention over the paged cache with torch's scaled_dot_product_attention: the CPU backend,
and the CUDA one where flash-attn is missing.

Single-token queries (decodes) are batched: their blocks are gathered into one padded
[num_single, kv_heads, max_len, head_dim] tensor and masked. Multi-token chunks run one SDPA
each; a chunk with no cached prefix attends to its own k/v without touching the cache, and one
whose cached prefix is no longer than itself takes the causal kernel too. With ALiBi the
boolean masks become additive biases (layers/attention/alibi.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layers.attention.alibi import alibi_bias
from layers.attention.backend import AttentionBackend, KVCache, write_kv
from layers.attention.metadata import AttentionMetadata
from layers.attention.paged_decode import (
    kernel_fits,
    paged_decode_attention,
    shared_tree_attention,
)
from layers.attention.tree import tree_depths, tree_mask


def _window_ok(key_pos: torch.Tensor, query_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    ok = key_pos <= query_pos
    if window is not None:
        ok &= key_pos > query_pos - window
    return ok


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    # index_select over whole blocks as rows is several times faster than advanced indexing.
    rows = cache.view(cache.shape[0], -1).index_select(0, block_ids.flatten())
    return rows.view(*block_ids.shape, *cache.shape[1:])


def _causal_after_prefix(q, k_cache, v_cache, meta: AttentionMetadata, i: int, scale: float):
    """A prompt chunk whose first `start` tokens' K/V are already cached (a shared system
    prompt, an earlier turn): SDPA's causal kernel aligns the mask top-left, so the chunk's
    queries go in after `start` zero rows, which makes the problem square, and those rows'
    outputs are dropped. The causal kernel runs ~1.5x faster than the same attention with
    an explicit [n, ctx] mask, and the padding costs start^2/2 scores, so this is the path
    while start <= n. q: [1, heads, n, head_dim]. Returns [1, heads, n, head_dim]."""
    layout = meta.layout
    start, n = layout.start_positions[i], layout.query_lens[i]
    ctx = start + n
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    nb = -(-ctx // layout.block_size)
    block_ids = torch.tensor(layout.block_tables[i][:nb], dtype=torch.long, device=q.device)
    keys = _gather(k_cache, block_ids).view(-1, kv_heads, head_dim)[:ctx].transpose(0, 1)
    values = _gather(v_cache, block_ids).view(-1, kv_heads, head_dim)[:ctx].transpose(0, 1)
    padded = torch.cat([q.new_zeros(1, q.shape[1], start, head_dim), q], dim=2)
    o = F.scaled_dot_product_attention(
        padded, keys[None], values[None], is_causal=True, scale=scale, enable_gqa=True
    )
    return o[:, :, start:]


class TorchSDPABackend(AttentionBackend):
    name = "torch-sdpa"

    @staticmethod
    def _decode_inputs(meta: AttentionMetadata, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The single-token rows' block tables [s, max_blocks] (padded with the null block)
        and positions [s], built once per step."""
        if meta.decode_inputs is None:
            layout = meta.layout
            s = layout.num_single
            tables = layout.block_tables[:s]
            max_blocks = max(len(t) for t in tables)
            padded = [t + [0] * (max_blocks - len(t)) for t in tables]
            meta.decode_inputs = (
                torch.tensor(padded, dtype=torch.long, device=device),
                torch.tensor(layout.start_positions[:s], device=device),
            )
        return meta.decode_inputs

    def _single(self, meta: AttentionMetadata, device, window: int | None, alibi):
        key = ("single", window, None if alibi is None else alibi.data_ptr())
        if key not in meta.cache:
            block_ids, positions = self._decode_inputs(meta, device)
            key_pos = torch.arange(block_ids.shape[1] * meta.layout.block_size, device=device)
            ok = _window_ok(key_pos[None, :], positions[:, None], window)  # [s, max_len]
            if alibi is None:
                mask = ok[:, None, None, :]  # [s, 1, 1, max_len]
            else:  # [s, heads, 1, max_len]
                mask = alibi_bias(
                    alibi, positions[:, None], key_pos[None, :], ok[:, None], alibi.dtype
                )
            meta.cache[key] = (block_ids, mask)
        return meta.cache[key]

    def _chunk(self, meta: AttentionMetadata, i: int, device, window: int | None, alibi):
        key = ("chunk", i, window, None if alibi is None else alibi.data_ptr())
        if key not in meta.cache:
            layout = meta.layout
            start, n = layout.start_positions[i], layout.query_lens[i]
            ctx = start + n
            nb = -(-ctx // layout.block_size)
            block_ids = torch.tensor(layout.block_tables[i][:nb], dtype=torch.long, device=device)
            tree = layout.draft_parents[i] if layout.draft_parents else None
            key_pos = torch.arange(ctx, device=device)
            if tree is not None:
                mask = tree_mask(tree, start, window, device)
                query_pos = start + torch.tensor(tree_depths(tree), device=device)
                key_pos = torch.cat([key_pos[:start], query_pos])  # tree slots hold their nodes
            else:
                query_pos = torch.arange(start, ctx, device=device)
                mask = _window_ok(key_pos[None, :], query_pos[:, None], window)
            if alibi is not None:  # [heads, n, ctx]
                mask = alibi_bias(alibi, query_pos, key_pos, mask, alibi.dtype)
            meta.cache[key] = (block_ids, mask)  # [n, ctx]
        return meta.cache[key]

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
        write_kv(kv_cache, k, v, meta.slot_mapping)
        k_cache, v_cache = kv_cache
        layout = meta.layout
        kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        out = torch.empty_like(q)
        s = layout.num_single
        if s and torch.compiler.is_compiling():
            # A compiled decode step (shards/compiled_decode.py): all rows are single tokens,
            # or the nodes of one sequence's tree, with their own mask.
            block_ids, positions = meta.decode_inputs
            if meta.decode_mask is not None:
                out[:s] = shared_tree_attention(
                    q[:s], k_cache, v_cache, block_ids, meta.decode_mask, scale
                )
            else:
                out[:s] = paged_decode_attention(
                    q[:s],
                    k_cache,
                    v_cache,
                    block_ids,
                    positions,
                    scale,
                    sliding_window,
                    alibi_slopes,
                )
        elif s and kernel_fits(q, k_cache, sliding_window, alibi_slopes):
            block_ids, positions = self._decode_inputs(meta, q.device)
            out[:s] = torch.ops.shardserve_kernels.paged_decode(
                q[:s], k_cache, v_cache, block_ids, positions, scale
            )
        elif s:
            block_ids, mask = self._single(meta, q.device, sliding_window, alibi_slopes)
            keys = _gather(k_cache, block_ids).view(s, -1, kv_heads, head_dim).transpose(1, 2)
            values = _gather(v_cache, block_ids).view(s, -1, kv_heads, head_dim).transpose(1, 2)
            if q.is_cuda:
                # SDPA's fused CUDA kernels take a mask or GQA, not both (it falls back to
                # unfused math). One query per sequence: each KV head's group of query heads
                # becomes that head's query rows, all at the same position, so no GQA is left.
                qg = q[:s].view(s, kv_heads, -1, head_dim)  # [s, kv_heads, group, head_dim]
                if alibi_slopes is not None:  # per query head: [s, kv_heads, group, max_len]
                    mask = mask.view(s, kv_heads, -1, mask.shape[-1])
                o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=scale)
                out[:s] = o.reshape(s, -1, head_dim)
            else:
                o = F.scaled_dot_product_attention(
                    q[:s].unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True
                )  # [s, heads, 1, head_dim]
                out[:s] = o.squeeze(2)
        token = s
        for i in range(s, len(layout.query_lens)):
            start, n = layout.start_positions[i], layout.query_lens[i]
            qc = q[token : token + n].transpose(0, 1).unsqueeze(0)  # [1, heads, n, head_dim]
            tree = layout.draft_parents[i] if layout.draft_parents else None
            plain = sliding_window is None and alibi_slopes is None and tree is None
            if start == 0 and plain:
                keys = k[token : token + n].transpose(0, 1).unsqueeze(0)
                values = v[token : token + n].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(
                    qc,
                    keys,
                    values,
                    is_causal=True,
                    scale=scale,
                    enable_gqa=True,
                )
            elif plain and start <= n:
                o = _causal_after_prefix(qc, k_cache, v_cache, meta, i, scale)
            else:
                block_ids, mask = self._chunk(meta, i, q.device, sliding_window, alibi_slopes)
                ctx = start + n
                keys = (
                    _gather(k_cache, block_ids).view(-1, kv_heads, head_dim)[:ctx].transpose(0, 1)
                )
                values = (
                    _gather(v_cache, block_ids).view(-1, kv_heads, head_dim)[:ctx].transpose(0, 1)
                )
                o = F.scaled_dot_product_attention(
                    qc,
                    keys.unsqueeze(0),
                    values.unsqueeze(0),
                    attn_mask=mask,
                    scale=scale,
                    enable_gqa=True,
                )
            out[token : token + n] = o.squeeze(0).transpose(0, 1)
            token += n
        return out
