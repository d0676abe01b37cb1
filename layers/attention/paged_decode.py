"""Decode attention over the paged cache written for torch.compile (CPU compiled decode steps).

One query per sequence. Scores and the weighted sum are plain multiply-and-sum reductions over
cache rows addressed through the block table, so inductor reads each K/V row where it lies in
the cache instead of gathering the sequence's blocks into a new tensor first (what the eager
SDPA path must do). Decode attention is bound by reading K/V, not by arithmetic, so reductions
lose nothing to a matmul here.
"""

from __future__ import annotations

import torch


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [s, heads, head_dim]; caches: [num_blocks, block_size, kv_heads, head_dim];
    block_ids: [s, width] (padded with the null block); positions: [s], the query's position,
    whose own K/V are already in the cache; alibi_slopes: [heads] or None.
    Returns [s, heads, head_dim]."""
    s, heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    keys = k_cache[block_ids].view(s, -1, kv_heads, 1, head_dim)  # [s, ctx, kv_heads, 1, d]
    values = v_cache[block_ids].view(s, -1, kv_heads, 1, head_dim)
    qg = q.view(s, 1, kv_heads, group, head_dim)
    scores = (qg * keys).sum(-1) * scale  # [s, ctx, kv_heads, group]
    key_pos = torch.arange(block_ids.shape[1] * block_size, device=q.device)
    ok = key_pos[None, :] <= positions[:, None]  # [s, ctx]
    if sliding_window is not None:
        ok = ok & (key_pos[None, :] > positions[:, None] - sliding_window)
    if alibi_slopes is not None:  # slope x distance, per query head
        dist = (key_pos[None, :] - positions[:, None]).to(scores.dtype)  # [s, ctx]
        scores = scores + dist[:, :, None, None] * alibi_slopes.view(kv_heads, group)
    scores = scores.masked_fill(~ok[:, :, None, None], float("-inf"))
    probs = torch.softmax(scores.float(), dim=1).to(q.dtype)
    out = (probs[..., None] * values).sum(1)  # [s, kv_heads, group, d]
    return out.reshape(s, heads, head_dim)


def shared_tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The rows of one sequence's lookahead tree, attending over its cache at once: its K/V
    are gathered once and every row is scored against them in one SDPA call (per-row
    reductions would read the whole context again for each of the tree's rows; SDPA's CPU
    kernel beat two bmm calls and a softmax by ~25 % at 16 rows over 1,000 positions).
    q: [s, heads, head_dim]; block_ids: [1, width], the sequence's table; mask:
    [s, width, block_size] bool, the slots each row sees (layers/attention/tree.py).
    Returns [s, heads, head_dim]."""
    s, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    keys = k_cache[block_ids[0]].reshape(-1, kv_heads, head_dim).transpose(0, 1)  # [kv, ctx, d]
    values = v_cache[block_ids[0]].reshape(-1, kv_heads, head_dim).transpose(0, 1)
    # Each KV head's query heads become its rows, so no GQA is left for SDPA to expand.
    qg = q.view(s, kv_heads, group, head_dim).permute(1, 0, 2, 3).reshape(kv_heads, -1, head_dim)
    rows_mask = mask.view(s, 1, -1).expand(s, group, -1).reshape(s * group, -1)
    out = torch.nn.functional.scaled_dot_product_attention(
        qg[None], keys[None], values[None], attn_mask=rows_mask, scale=scale
    )  # [1, kv_heads, s * group, d]
    return out.view(kv_heads, s, group, head_dim).permute(1, 0, 2, 3).reshape(s, heads, head_dim)
