"""Tree verification pieces in isolation: depths, the attention mask, greedy acceptance on
known choices, K/V moves, the compiled steps' tree attention."""

from __future__ import annotations

import pytest
import torch

from layers.attention.paged_decode import shared_tree_attention
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


# (block size, tokens before the tree): a context shorter than half a block leaves a row
# nothing to see in the second part of every block; an odd block size keeps one part
@pytest.mark.parametrize("block_size,start", [(4, 1), (4, 13), (16, 40), (3, 7)])
def test_shared_tree_attention_is_a_masked_softmax_over_the_table(block_size, start):
    """The compiled steps' tree attention (scores in two parts of every block, merged by
    their log-sum-exps) against softmax(q k^T + mask) v over the gathered context."""
    g = torch.Generator().manual_seed(block_size * 100 + start)
    heads, kv_heads, d, blocks = 6, 2, 8, 12
    n = len(PARENTS) + 1
    width = -(-(start + n) // block_size) + 1  # one block more than needed: never seen
    table = torch.randperm(blocks - 1, generator=g)[:width] + 1  # scattered, not block 0
    k_cache, v_cache = (torch.randn(blocks, block_size, kv_heads, d, generator=g) for _ in "kv")
    q = torch.randn(n, heads, d, generator=g)
    mask = torch.zeros(n, width * block_size, dtype=torch.bool)
    mask[:, : start + n] = tree_mask(PARENTS, start, None, "cpu")
    got = shared_tree_attention(q, k_cache, v_cache, table[None], mask.view(n, width, -1), 0.3)

    keys = k_cache[table].reshape(-1, kv_heads, d).repeat_interleave(heads // kv_heads, 1)
    values = v_cache[table].reshape(-1, kv_heads, d).repeat_interleave(heads // kv_heads, 1)
    scores = torch.einsum("shd,chd->hsc", q, keys) * 0.3
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    want = torch.einsum("hsc,chd->shd", probs, values)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


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
