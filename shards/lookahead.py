"""Verifying lookahead draft trees in the shard: where each tree token sits, what it attends to,
which branch the model agrees with, and moving accepted K/V into place.

A sequence's tree arrives as token_ids = [real token, draft 1, ...] with `draft_parents`
(router/lookahead.py). Token i is written to cache slot start + i, at position start + depth(i);
it attends to the whole cache before `start` and to its ancestors and itself in the tree.
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


def accept_greedy(
    choices: list[int], token_ids: list[int], parents: list[int]
) -> tuple[list[int], list[int]]:
    """Walk the tree from the root while a child holds the model's choice (`choices[i]` is the
    argmax after node i). Returns the accepted draft nodes and the output tokens: their tokens,
    then the model's choice after the last of them."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents, start=1):
        children.setdefault(p, []).append(i)
    node, path = 0, []
    while True:
        want = choices[node]
        nxt = next((c for c in children.get(node, ()) if token_ids[c] == want), None)
        if nxt is None:
            return path, [token_ids[c] for c in path] + [want]
        path.append(nxt)
        node = nxt


def move_kv(kv_caches, moves: list[tuple[int, int]]) -> None:
    """Copy cache slots src → dst in every layer (all sources read before any write)."""
    if not moves:
        return
    device = kv_caches[0][0].device
    src = torch.tensor([m[0] for m in moves], dtype=torch.long, device=device)
    dst = torch.tensor([m[1] for m in moves], dtype=torch.long, device=device)
    for cache in kv_caches:
        for t in cache:
            flat = t.view(-1, *t.shape[2:])  # [blocks * block_size, heads, head_dim]
            flat[dst] = flat[src]
