"""ALiBi (Press et al., "Train Short, Test Long"): no position embedding; instead each head h adds
`slope[h] * (key_position - query_position)` to its attention scores, so attention decays
linearly with distance. Baichuan's 13B models use it (their `_gen_alibi_mask` adds
`slope * key_position`, which differs by a per-query constant that softmax ignores)."""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> list[float]:
    """The geometric slopes 2^(-8/n), 2^(-16/n), ... for n a power of two; for other head
    counts, those of the power of two below, then every other slope of the one above."""
    if math.log2(num_heads).is_integer():
        start = 2 ** (-8 / num_heads)
        return [start ** (i + 1) for i in range(num_heads)]
    below = 2 ** math.floor(math.log2(num_heads))
    return alibi_slopes(below) + alibi_slopes(2 * below)[0::2][: num_heads - below]


def local_slopes(num_heads: int, rank: int, local_heads: int, device) -> torch.Tensor:
    """The slopes of the heads a tensor-parallel rank holds (contiguous, in rank order)."""
    slopes = alibi_slopes(num_heads)[rank * local_heads : (rank + 1) * local_heads]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def alibi_bias(
    slopes: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor, ok: torch.Tensor, dtype
) -> torch.Tensor:
    """Additive attention bias [..., heads, queries, keys]: slope x distance where `ok`
    ([..., queries, keys] bool) allows attending, -inf elsewhere. query_pos: [..., queries];
    key_pos: [..., keys]."""
    dist = (key_pos[..., None, :] - query_pos[..., :, None]).to(torch.float32)
    bias = slopes.view(-1, 1, 1) * dist.unsqueeze(-3)
    return bias.masked_fill(~ok.unsqueeze(-3), float("-inf")).to(dtype)
