"""Qwen v1 (`QWenLMHeadModel`) from its official checkpoint layout, without remote code: a tiny
random checkpoint written in that layout from a transformers Qwen2 model with the same weights
(Qwen v1's block is Qwen2's with fused QKV and other names) gives transformers' logits, and TP=2
gives TP=1's."""

from __future__ import annotations

import random

import pytest

from shards.model_config import load_model_config
from tests.support.families import as_qwen_v1
from tests.support.tiny import build_hf_model, hf_logits, make_worker, our_logits, tiny_config
from tests.support.tp import tp_logits


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    hf = build_hf_model(tiny_config("qwen2", num_key_value_heads=4, max_position_embeddings=128))
    return hf, as_qwen_v1(hf, tmp_path_factory.mktemp("qwen") / "qwen-v1")


def _tokens(n: int) -> list[int]:
    rng = random.Random(5)
    return [rng.randrange(3, 160) for _ in range(n)]


def test_config_fields_map_and_the_context_stops_where_ntk_and_logn_begin(qwen):
    _, folder = qwen
    cfg = load_model_config(folder)
    assert cfg.architecture == "QWenLMHeadModel"
    assert cfg.intermediate_size == 128 and cfg.head_dim == 16 and cfg.num_key_value_heads == 4
    assert cfg.max_position_embeddings == 128  # seq_length, not the 512 the file also names
    assert not cfg.tie_word_embeddings and not cfg.attention_bias


def test_logits_match_transformers_qwen2_with_the_same_weights(qwen):
    hf, folder = qwen
    tokens = _tokens(20)
    ref = hf_logits(hf, tokens, 12)
    got = our_logits(make_worker(folder), tokens, 12, chunk=5)
    assert (got - ref).abs().max().item() <= 1e-4


def test_tp2_splits_the_fused_qkv_by_proportion(qwen):
    _, folder = qwen
    tokens = _tokens(16)
    ref = our_logits(make_worker(folder), tokens, 10)
    got = tp_logits(folder, 2, tokens, 10)
    assert (got - ref).abs().max().item() <= 1e-4
