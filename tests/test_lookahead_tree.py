"""Tree verification pieces in isolation: depths, the attention mask, greedy acceptance on
known choices, K/V moves."""

from __future__ import annotations

import torch

from layers.attention.tree import tree_ancestry, tree_depths, tree_mask
from shards.lookahead import accept_greedy, accept_sampled, move_kv

# root r, then drafts: 1 -> 2 -> 3 on the first branch, 4 under 1, 5 under the root
PARENTS = [0, 1, 2, 1, 0]
TOKENS = [100, 5, 6, 7, 8, 9]


def test_depths_and_ancestry():
    assert tree_depths(PARENTS) == [0, 1, 2, 3, 2, 1]
    anc = tree_ancestry(PARENTS)
    assert anc[3].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert anc[4].nonzero().flatten().tolist() == [0, 1, 4]
    assert anc[5].nonzero().flatten().tolist() == [0, 5]


def test_mask_sees_the_whole_cache_and_only_ancestors_in_the_tree():
    m = tree_mask(PARENTS, start=3, window=None, device="cpu")
    assert m.shape == (6, 9)
    assert m[:, :3].all()
    assert m[4, 3:].nonzero().flatten().tolist() == [0, 1, 4]
    # with a window of 3 positions, node 3 (position 6) no longer sees cache positions < 4
    w = tree_mask(PARENTS, start=3, window=3, device="cpu")
    assert w[3].nonzero().flatten().tolist() == [3 + 1, 3 + 2, 3 + 3]  # tree nodes 1, 2, 3
    assert w[0, :3].tolist() == [False, True, True]  # root at position 3 sees 1 and 2


def test_greedy_accepts_the_branch_the_model_chooses():
    # after the root the model picks 5 (node 1); after node 1 it picks 8 (node 4); then 42
    choices = [5, 8, 0, 0, 42, 0]
    assert accept_greedy(choices, TOKENS, PARENTS) == ([1, 4], [5, 8, 42])
    # the first branch all the way, then a bonus token
    assert accept_greedy([5, 6, 7, 11, 0, 0], TOKENS, PARENTS) == ([1, 2, 3], [5, 6, 7, 11])
    # nothing matches: just the model's own next token
    assert accept_greedy([77, 0, 0, 0, 0, 0], TOKENS, PARENTS) == ([], [77])


def test_kv_moves_read_every_source_before_writing():
    k = torch.arange(2 * 4 * 1 * 1, dtype=torch.float32).view(2, 4, 1, 1)  # 2 blocks of 4
    v = -k.clone()
    # a chain of moves where a destination is another move's source
    move_kv([(k, v)], [(5, 1), (6, 5)])
    assert k.flatten().tolist() == [0, 5, 2, 3, 4, 6, 6, 7]
    assert v.flatten().tolist() == [-x for x in k.flatten().tolist()]


def test_sampled_acceptance_keeps_the_target_distribution():
    # root distribution over 4 tokens; drafts propose tokens 2 then 3 as two children of the
    # root, and token 1 below the first child
    p_root = torch.tensor([0.1, 0.2, 0.3, 0.4])
    p_child = torch.tensor([0.25, 0.25, 0.25, 0.25])
    probs = torch.stack([p_root, p_child, p_child, p_child])
    tokens, parents = [9, 2, 1, 3], [0, 1, 0]
    gen = torch.Generator().manual_seed(0)
    n = 20000
    first = torch.zeros(4)
    second_after_2 = torch.zeros(4)
    for _ in range(n):
        _, out = accept_sampled(probs, tokens, parents, gen)
        first[out[0]] += 1
        if out[0] == 2:
            second_after_2[out[1]] += 1
    # the first token follows the root distribution, whatever the drafts proposed
    assert (first / n - p_root).abs().max() < 0.015
    # and the token after an accepted draft follows that draft's row
    assert (second_after_2 / second_after_2.sum() - p_child).abs().max() < 0.02
