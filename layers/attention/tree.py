"""Lookahead draft trees in attention.

A sequence's tree arrives as token_ids = [real token, draft 1, ...] with parent indices
(`draft_parents`, router/lookahead/drafter.py). Token i is written to cache slot start + i,
at position start + depth(i); it attends to the whole cache before `start` and to its ancestors and
itself in the tree, so every branch sees exactly the context plain decoding would give it.
"""

from __future__ import annotations

import torch


def tree_depths(parents: list[int]) -> list[int]:
    """Depth of every tree node: [0 for the root, then one per draft]."""
    depths = [0]
    for p in parents:
        depths.append(depths[p] + 1)
    return depths


def tree_ancestry(parents: list[int]) -> torch.Tensor:
    """[n, n] bool: entry (i, j) is True when node j is node i or one of its ancestors."""
    n = len(parents) + 1
    anc = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents, start=1):
        anc[i] |= anc[p]
    return anc


def tree_mask(parents: list[int], start: int, window: int | None, device) -> torch.Tensor:
    """[n, start + n] bool attention mask of a tree chunk over the cache and itself."""
    pos = torch.tensor([start + d for d in tree_depths(parents)], device=device)
    n = pos.numel()
    cached = torch.arange(start, device=device)[None, :].expand(n, start)
    ok_cache = torch.ones(n, start, dtype=torch.bool, device=device)
    ok_tree = tree_ancestry(parents).to(device)
    if window is not None:
        ok_cache = cached > pos[:, None] - window
        ok_tree = ok_tree & (pos[None, :] > pos[:, None] - window)
    return torch.cat([ok_cache, ok_tree], dim=1)
