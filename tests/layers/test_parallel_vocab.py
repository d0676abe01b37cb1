"""Vocabulary-parallel embedding and LM head: every rank's shard built in one process, as in
test_parallel_layers.py, against the unsharded lookup and logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers.embedding import ParallelLMHead, VocabParallelEmbedding
from layers.parallel import ParallelContext
from tests.layers.test_parallel_layers import (
    NUM_TOKENS,
    TOL,
    WORLD_SIZES,
    _assert_filled,
    _load,
    _randn,
)

# --- VocabParallelEmbedding and ParallelLMHead -----------------------------------------------

# 101 is prime: no world size divides it, so the last non-empty rank has padding rows. With 17 and
# four ranks, 16-row alignment leaves ranks 2 and 3 with no vocabulary at all.
VOCABS = [101, 17]
EMBED_DIM = 8


def _vocab_ranks(cls, ws: int, vocab: int, full: torch.Tensor) -> list:
    layers = []
    for rank in range(ws):
        layer = cls(vocab, EMBED_DIM, pctx=ParallelContext(rank=rank, world_size=ws))
        # Poison only the rows this rank owns: the padding rows must stay as built.
        layer.weight.data[: layer.vocab_end - layer.vocab_start].fill_(float("nan"))
        _load(layer, "weight", "", full)
        layers.append(layer)
    _assert_filled(layers)
    return layers


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_vocab_embedding_summed_outputs_equal_full_lookup(ws, vocab):
    table = _randn(vocab, EMBED_DIM, seed=60)
    layers = _vocab_ranks(VocabParallelEmbedding, ws, vocab, table)
    # Every id once, in an order that interleaves ranks, plus repeats of the edges.
    ids = torch.cat(
        [
            torch.randperm(vocab, generator=torch.Generator().manual_seed(61)),
            torch.tensor([0, vocab - 1, 0]),
        ]
    )
    out = sum(layer.forward_local(ids) for layer in layers)
    torch.testing.assert_close(out, F.embedding(ids, table), **TOL)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_vocab_ranks_cover_the_vocabulary_once_and_pad_with_zeros(ws, vocab):
    table = _randn(vocab, EMBED_DIM, seed=62)
    layers = _vocab_ranks(VocabParallelEmbedding, ws, vocab, table)
    assert len({layer.weight.shape for layer in layers}) == 1, "ranks must have equal shapes"
    assert layers[0].local_vocab_size % 16 == 0
    starts = [layer.vocab_start for layer in layers]
    ends = [layer.vocab_end for layer in layers]
    assert starts[0] == 0 and ends[-1] == vocab and starts[1:] == ends[:-1]
    owned = torch.cat([layer.weight[: layer.vocab_end - layer.vocab_start] for layer in layers])
    torch.testing.assert_close(owned, table, atol=0, rtol=0)
    padding = torch.cat([layer.weight[layer.vocab_end - layer.vocab_start :] for layer in layers])
    assert padding.shape[0] == ws * layers[0].local_vocab_size - vocab > 0
    assert torch.equal(padding, torch.zeros_like(padding))


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_lm_head_concatenated_logits_equal_full_logits(ws, vocab):
    w = _randn(vocab, EMBED_DIM, seed=63)
    hidden = _randn(NUM_TOKENS, EMBED_DIM, seed=64)
    layers = _vocab_ranks(ParallelLMHead, ws, vocab, w)
    logits = torch.cat([layer.forward_local(hidden) for layer in layers], dim=-1)
    assert logits.shape == (NUM_TOKENS, ws * layers[0].local_vocab_size)
    torch.testing.assert_close(logits[:, :vocab], F.linear(hidden, w), **TOL)
    assert torch.equal(logits[:, vocab:], torch.zeros_like(logits[:, vocab:]))


@pytest.mark.parametrize("cls", [VocabParallelEmbedding, ParallelLMHead])
@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_vocab_checkpoint_shape_is_global(ws, cls):
    layer = cls(101, EMBED_DIM, pctx=ParallelContext(ws - 1, ws))
    assert layer.checkpoint_shape("weight", "") == (101, EMBED_DIM)


def test_single_rank_lm_head_forward_cuts_padding_logits():
    w, hidden = _randn(101, EMBED_DIM, seed=65), _randn(NUM_TOKENS, EMBED_DIM, seed=66)
    (head,) = _vocab_ranks(ParallelLMHead, 1, 101, w)
    assert head.local_vocab_size == 112  # padded even on one rank
    torch.testing.assert_close(head(hidden), F.linear(hidden, w), **TOL)


def test_single_rank_embedding_forward_equals_lookup():
    table = _randn(101, EMBED_DIM, seed=67)
    (embed,) = _vocab_ranks(VocabParallelEmbedding, 1, 101, table)
    ids = torch.arange(101)
    torch.testing.assert_close(embed(ids), F.embedding(ids, table), **TOL)
