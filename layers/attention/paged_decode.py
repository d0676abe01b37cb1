"""Decode attention over the paged cache written for torch.compile (CPU compiled decode steps).

One query per sequence. Scores and the weighted sum are plain multiply-and-sum reductions over
cache rows addressed through the block table, so inductor reads each K/V row where it lies in
the cache instead of gathering the sequence's blocks into a new tensor first (what the eager
SDPA path must do). Decode attention is bound by reading K/V, not by arithmetic, so reductions
lose nothing to a matmul here.

Where the hand-written kernel is registered (paged_decode.cpp, AVX-512; shards/kernels.py), the
cache is float32 and the layer has neither a sliding window nor ALiBi, the kernel does it
instead, compiled steps and eager single-token rows alike: inductor's loops over these
reductions took ~100 us a layer for one sequence at a few hundred positions, a third of the
embedded model's decode step.
"""

from __future__ import annotations

import torch

from layers.quant.base import kernel_isa

# float32 only, for now: in bfloat16 the kernel's rounding differs from SDPA's, which verifies
# lookahead trees, and greedy outputs then part at near-ties (the kernel itself takes both).
KERNEL_DTYPES = (torch.float32,)


def kernel_fits(q: torch.Tensor, k_cache: torch.Tensor, sliding_window, alibi_slopes) -> bool:
    """Whether `shardserve_kernels::paged_decode` computes this layer's decode attention."""
    d = q.shape[-1]
    return (
        sliding_window is None
        and alibi_slopes is None
        and q.device.type == "cpu"
        and q.dtype in KERNEL_DTYPES
        and k_cache.dtype == q.dtype
        and d % 16 == 0
        and d <= 256
        and kernel_isa() >= 2
    )


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
    if kernel_fits(q, k_cache, sliding_window, alibi_slopes):
        return torch.ops.shardserve_kernels.paged_decode(
            q, k_cache, v_cache, block_ids, positions, scale
        )
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


def _slot_parts(x: torch.Tensor, parts: int) -> torch.Tensor:
    """[width, block_size, ...] -> [parts, width * block_size / parts, ...]: part p holds the
    p-th run of block_size / parts slots of every block. Splitting the block axis instead
    would have the compiler fix the table's width (a view of [width, ...] as [2, ...] asks
    whether width == 2, and the warm-up's width is 2)."""
    x = x.view(x.shape[0], parts, x.shape[1] // parts, *x.shape[2:]).transpose(0, 1)
    return x.reshape(parts, -1, *x.shape[3:])


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
    The context goes in as two parts, whose results merge by their log-sum-exps: the kernel
    shares (batch, head, query block) items out among threads, and an 8-row tree is one
    query block per KV head, 3 items for 2 cores, one of which then waits half the call
    (in isolation over 1,000 positions: ~255 us a layer instead of ~360 at 8 rows, ~390
    instead of ~480 at 16).
    q: [s, heads, head_dim]; block_ids: [1, width], the sequence's table; mask:
    [s, width, block_size] bool, the slots each row sees (layers/attention/tree.py).
    Returns [s, heads, head_dim]."""
    s, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    block_size = k_cache.shape[1]
    parts = 2 if block_size % 2 == 0 else 1
    # [parts, kv_heads, ctx / parts, d]
    keys = _slot_parts(k_cache[block_ids[0]], parts).transpose(1, 2)
    values = _slot_parts(v_cache[block_ids[0]], parts).transpose(1, 2)
    # Each KV head's query heads become its rows, so no GQA is left for SDPA to expand.
    qg = q.view(s, kv_heads, group, head_dim).permute(1, 0, 2, 3).reshape(kv_heads, -1, head_dim)
    seen = _slot_parts(mask.permute(1, 2, 0), parts)  # [parts, ctx / parts, s]
    seen = seen.permute(0, 2, 1)[:, :, None].expand(parts, s, group, -1)
    seen = seen.reshape(parts, s * group, -1)
    bias = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill(~seen, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qg[None].expand(parts, -1, -1, -1),
        keys,
        values,
        0.0,
        False,
        attn_mask=bias[:, None],
        scale=scale,
    )  # [parts, kv_heads, rows, d], [parts, kv_heads, rows]
    # A part a row sees nothing of comes back as zeros with a log-sum-exp of 0, not -inf.
    lse = lse.masked_fill(~seen.any(-1)[:, None], float("-inf"))
    weight = (lse - lse.amax(0)).exp()
    out = ((out * weight[..., None]).sum(0) / weight.sum(0)[..., None]).to(q.dtype)
    return out.view(kv_heads, s, group, head_dim).permute(1, 0, 2, 3).reshape(s, heads, head_dim)
