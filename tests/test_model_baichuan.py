"""Baichuan-7B / Baichuan2-7B from the official layout, without remote code: `W_pack` (fused
QKV) split by proportion, and Baichuan2's NormHead. References are transformers Llama models
with the same weights (Baichuan2's with the head rows normalized, as NormHead computes them)."""

from __future__ import annotations

import random

import pytest
import torch

from shards.model_config import ModelConfigError, model_config_from_dict
from shards.models.baichuan import BAICHUAN2_VOCAB
from tests.family_checkpoints import as_baichuan
from tests.tiny import build_hf_model, hf_logits, make_worker, our_logits, tiny_config
from tests.tp_helpers import tp_logits


def _pair(tmp_path_factory, vocab: int):
    hf = build_hf_model(tiny_config("llama", num_key_value_heads=4, vocab_size=vocab))
    gen = torch.Generator().manual_seed(1)
    raw = hf.lm_head.weight.detach() * torch.empty(vocab, 1).uniform_(0.5, 3.0, generator=gen)
    with torch.no_grad():  # what the reference computes: NormHead's rows for Baichuan2
        hf.lm_head.weight.copy_(
            torch.nn.functional.normalize(raw) if vocab == BAICHUAN2_VOCAB else raw
        )
    return hf, as_baichuan(hf, tmp_path_factory.mktemp("baichuan") / "model", raw)


@pytest.fixture(scope="module")
def baichuan2(tmp_path_factory):
    return _pair(tmp_path_factory, BAICHUAN2_VOCAB)


def _tokens(n: int) -> list[int]:
    rng = random.Random(2)
    return [rng.randrange(3, 160) for _ in range(n)]


def test_baichuan2_logits_match_with_its_normalized_head(baichuan2):
    hf, folder = baichuan2
    tokens = _tokens(14)
    got = our_logits(make_worker(folder, kv_kib=2048), tokens, 8, chunk=3)
    assert (got - hf_logits(hf, tokens, 8)).abs().max().item() <= 1e-4


def test_baichuan_7b_head_is_used_as_stored(tmp_path_factory):
    hf, folder = _pair(tmp_path_factory, 160)
    tokens = _tokens(14)
    got = our_logits(make_worker(folder), tokens, 8)
    assert (got - hf_logits(hf, tokens, 8)).abs().max().item() <= 1e-4


def test_tp2_splits_w_pack_and_normalizes_each_vocab_slice(baichuan2):
    _, folder = baichuan2
    tokens = _tokens(12)
    ref = our_logits(make_worker(folder, kv_kib=2048), tokens, 8)
    got = tp_logits(folder, 2, tokens, 8)
    assert (got - ref).abs().max().item() <= 1e-4


def test_baichuan_13b_alibi_is_refused_by_name():
    raw = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_size": 5120,
           "intermediate_size": 13696, "num_attention_heads": 40, "num_hidden_layers": 40,
           "vocab_size": 125696}  # fmt: skip
    with pytest.raises(ModelConfigError, match="ALiBi attention, which is not supported yet"):
        model_config_from_dict(raw)
