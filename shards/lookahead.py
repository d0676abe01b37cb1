"""Verifying lookahead draft trees in the shard: which branch the model agrees with, and moving
accepted K/V into place. Where tree tokens sit and what they attend to: layers/attention/tree.py.
"""

from __future__ import annotations

import torch


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
