"""Verifying lookahead draft trees in the shard: which branch the model agrees with, and moving
accepted K/V into place. Where tree tokens sit and what they attend to: layers/attention/tree.py.
"""

from __future__ import annotations

import torch


def _children(parents: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, p in enumerate(parents, start=1):
        out.setdefault(p, []).append(i)
    return out


def accept_greedy(
    choices: list[int], token_ids: list[int], parents: list[int]
) -> tuple[list[int], list[int]]:
    """Walk the tree from the root while a child holds the model's choice (`choices[i]` is the
    argmax after node i). Returns the accepted draft nodes and the output tokens: their tokens,
    then the model's choice after the last of them."""
    children = _children(parents)
    node, path = 0, []
    while True:
        want = choices[node]
        nxt = next((c for c in children.get(node, ()) if token_ids[c] == want), None)
        if nxt is None:
            return path, [token_ids[c] for c in path] + [want]
        path.append(nxt)
        node = nxt


def accept_sampled(
    probs: torch.Tensor, token_ids: list[int], parents: list[int], generator: torch.Generator
) -> tuple[list[int], list[int]]:
    """Speculative sampling over a tree of point-mass drafts; the output is distributed exactly
    as sampling token by token from `probs` (row i: the distribution after node i).

    At a node, each child is tried in turn: accepted with probability r(token), where r starts
    as the node's distribution; a rejected child's token is removed from r (the residual
    (r - q)+ for a draft q that is certain of it) and r renormalized. If no child is accepted,
    the next token is drawn from what is left of r."""
    children = _children(parents)
    node, path = 0, []
    while True:
        r = probs[node]
        nxt = None
        for c in children.get(node, ()):
            t = token_ids[c]
            u = torch.rand((), generator=generator, device=r.device)
            if bool(u < r[t]):
                nxt = c
                break
            r = r.clone()
            r[t] = 0.0
            r = r / r.sum()
        if nxt is None:
            token = int(torch.multinomial(r, 1, generator=generator))
            return path, [token_ids[c] for c in path] + [token]
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
