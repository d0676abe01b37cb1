"""Baichuan / Baichuan2 7B and 13B from the official layout, without remote code: `W_pack`
(fused QKV) split by proportion, Baichuan2's NormHead, the 13B models' ALiBi. References are
transformers Llama models with the same weights (Baichuan2's with the head rows normalized, as
NormHead computes them; for 13B with rotary made the identity and ALiBi's biases added to the
attention mask, and the biases themselves checked by hand)."""

from __future__ import annotations

import random

import pytest
import torch

from layers.attention.alibi import alibi_bias, alibi_slopes
from shards.model_config import load_model_config, model_config_from_dict
from shards.models.baichuan import BAICHUAN2_VOCAB
from shards.wire import ScheduledSeq
from tests.support.families import as_baichuan
from tests.support.tiny import build_hf_model, hf_logits, make_worker, our_logits, tiny_config
from tests.support.tp import tp_logits


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


# ---------------------------------------------------------------- 13B: ALiBi


def test_alibi_slopes_by_hand():
    assert alibi_slopes(8) == [2.0**-i for i in range(1, 9)]
    # 6 heads: the 4-head slopes, then every other 8-head slope (Baichuan's _get_interleave)
    assert alibi_slopes(6) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    forty = alibi_slopes(40)  # Baichuan-13B's head count
    assert forty[:32] == pytest.approx([2 ** (-0.25 * i) for i in range(1, 33)], rel=1e-12)
    assert forty[32:] == pytest.approx([2 ** (-0.125 * i) for i in range(1, 16, 2)], rel=1e-12)


def test_alibi_bias_by_hand():
    slopes = torch.tensor([0.5, 0.25])
    query_pos, key_pos = torch.tensor([2, 3]), torch.arange(4)
    ok = key_pos[None, :] <= query_pos[:, None]
    bias = alibi_bias(slopes, query_pos, key_pos, ok, torch.float32)
    inf = float("-inf")
    expected = torch.tensor([
        [[-1.0, -0.5, 0.0, inf], [-1.5, -1.0, -0.5, 0.0]],
        [[-0.5, -0.25, 0.0, inf], [-0.75, -0.5, -0.25, 0.0]],
    ])  # fmt: skip
    assert torch.equal(bias, expected)


def _alibi_reference(hf):
    """`hf` (transformers Llama) turned into Baichuan-13B's computation: rotary made the
    identity, and ALiBi's slope x distance added to the causal mask it is given."""
    c = hf.config
    head_dim = c.hidden_size // c.num_attention_heads

    def no_rotation(x, position_ids):
        shape = (*position_ids.shape, head_dim)
        return torch.ones(shape, dtype=x.dtype), torch.zeros(shape, dtype=x.dtype)

    hf.model.rotary_emb.forward = no_rotation
    slopes = torch.tensor(alibi_slopes(c.num_attention_heads))

    @torch.inference_mode()
    def logits(tokens: list[int]) -> torch.Tensor:
        pos = torch.arange(len(tokens))
        dist = (pos[None, :] - pos[:, None]).float()
        bias = (slopes[:, None, None] * dist).masked_fill(dist > 0, float("-inf"))
        return hf(torch.tensor([tokens]), attention_mask=bias[None]).logits[0].float()

    return logits


@pytest.fixture(scope="module")
def baichuan_13b(tmp_path_factory):
    # 6 heads: slopes from two powers of two; Baichuan2-13B's vocabulary and NormHead
    hf = build_hf_model(tiny_config("llama", num_attention_heads=6, num_key_value_heads=6,
                                    hidden_size=96, vocab_size=BAICHUAN2_VOCAB))  # fmt: skip
    raw = hf.lm_head.weight.detach().clone()
    with torch.no_grad():
        hf.lm_head.weight.copy_(torch.nn.functional.normalize(raw))
    folder = as_baichuan(hf, tmp_path_factory.mktemp("baichuan13b") / "model", raw, alibi=True)
    return _alibi_reference(hf), folder


def test_baichuan_13b_config_turns_on_alibi(baichuan_13b):
    _, folder = baichuan_13b
    cfg = load_model_config(folder)
    assert cfg.alibi and cfg.notes == (
        "Baichuan positions: ALiBi (the config carries model_max_length only, as the 13B "
        "models' do)",
    )


def _official(arch: str, hidden: int, **context) -> dict:
    return {"architectures": [arch], "model_type": "baichuan", "hidden_size": hidden,
            "intermediate_size": 2 * hidden, "num_attention_heads": 32, "num_hidden_layers": 2,
            "vocab_size": BAICHUAN2_VOCAB, **context}  # fmt: skip


@pytest.mark.parametrize(
    "config, alibi",
    [
        # the released configs: Baichuan2-7B carries both keys, the 13B models one
        (_official("BaichuanForCausalLM", 4096, max_position_embeddings=4096,
                   model_max_length=4096), False),
        (_official("BaichuanForCausalLM", 5120, model_max_length=4096), True),
        (_official("BaiChuanForCausalLM", 4096, max_position_embeddings=4096), False),
        # other widths (pruned or small variants) follow what the config carries
        (_official("BaichuanForCausalLM", 2048, max_position_embeddings=4096,
                   model_max_length=4096), False),
        (_official("BaichuanForCausalLM", 4096, model_max_length=4096), True),
        (_official("BaiChuanForCausalLM", 5120, model_max_length=4096), False),
        # neither key: the width decides (vLLM's rule)
        (_official("BaichuanForCausalLM", 4096), False),
        (_official("BaichuanForCausalLM", 5120), True),
    ],
)  # fmt: skip
def test_baichuan_positions_follow_the_config(config, alibi):
    cfg = model_config_from_dict(config)
    assert cfg.alibi == alibi
    assert cfg.notes[0].startswith(f"Baichuan positions: {'ALiBi' if alibi else 'rotary'} (")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_baichuan_13b_alibi_logits_match(baichuan_13b, compiled):
    reference, folder = baichuan_13b
    tokens = _tokens(16)
    worker = make_worker(folder, kv_kib=4096, cpu_compile=compiled)
    assert (worker.runner.compiled is not None) == compiled
    got = our_logits(worker, tokens, 9, chunk=4)  # chunks over a cached prefix, then decodes
    assert (got - reference(tokens)).abs().max().item() <= 1e-4


def test_baichuan_13b_alibi_in_a_draft_tree(baichuan_13b):
    """A lookahead tree's nodes see ALiBi distances by their positions (depths), not slots."""
    reference, folder = baichuan_13b
    tokens = _tokens(12)
    worker = make_worker(folder, kv_kib=4096)
    blocks = list(range(1, 6))
    worker.runner.forward([ScheduledSeq(1, tokens[:8], 0, blocks, False)])
    # root tokens[8]; a wrong branch [5, 6] first, then the true continuation tokens[9:12]
    tree = [tokens[8], 5, 6, *tokens[9:12]]
    parents = [0, 1, 0, 3, 4]
    hidden, _ = worker.runner.forward(
        [ScheduledSeq(1, tree, 8, blocks, True, draft_parents=parents)]
    )
    got = worker.model.compute_logits(hidden[torch.tensor([0, 3, 4, 5])]).float()
    assert (got - reference(tokens)[8:12]).abs().max().item() <= 1e-4


def test_baichuan_13b_tp2_equals_tp1(baichuan_13b):
    _, folder = baichuan_13b
    tokens = _tokens(12)
    ref = our_logits(make_worker(folder, kv_kib=4096), tokens, 8)
    got = tp_logits(folder, 2, tokens, 8)  # 3 heads and their own slopes per rank
    assert (got - ref).abs().max().item() <= 1e-4
