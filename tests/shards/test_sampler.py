"""Sampler on fabricated logits (no model): greedy rows, the distribution each sampled row is
drawn from (temperature, top-k, top-p, min-p and their order), the draw itself, per-request
seeds. Penalties and logprobs: test_sampler_penalties.py."""

from __future__ import annotations

import math

import pytest
import torch

from shards.sampler import Sampler, SeqSamplingState, greedy_tokens, sampling_probs
from shards.wire import SamplingParams

CPU = torch.device("cpu")
# float32 softmax against a float64 or hand-computed reference
PROB_TOL = {"rtol": 1e-5, "atol": 1e-6}


def _logits_from_probs(*probs: float) -> torch.Tensor:
    """One row of logits whose softmax is `probs` (which must sum to 1)."""
    return torch.tensor([math.log(p) for p in probs], dtype=torch.float32)[None, :]


def _renormalized(probs: list[float], keep: list[int]) -> torch.Tensor:
    kept = sum(probs[i] for i in keep)
    out = [probs[i] / kept if i in keep else 0.0 for i in range(len(probs))]
    return torch.tensor(out, dtype=torch.float32)


def _reference_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The definition, in float64: temperature, then top-k, top-p, min-p, renormalizing after
    each filter."""
    z = row.double() / p.temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if 0 < p.top_k < z.numel():
        keep[:] = False
        keep[z.topk(p.top_k).indices] = True
    probs = z.masked_fill(~keep, float("-inf")).softmax(-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        keep[order[mass_before >= p.top_p]] = False
        probs = z.masked_fill(~keep, float("-inf")).softmax(-1)
    if p.min_p > 0:
        keep &= probs >= p.min_p * probs.max()
        probs = z.masked_fill(~keep, float("-inf")).softmax(-1)
    return probs.float()


def _states(params: list[SamplingParams], vocab: int, prompts=None) -> list[SeqSamplingState]:
    prompts = prompts or [[] for _ in params]
    return [
        SeqSamplingState.create(p, ids, vocab, CPU) for p, ids in zip(params, prompts, strict=True)
    ]


def _random_logits(rows: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


# ---------------------------------------------------------------- temperature 0 is argmax


def test_greedy_tokens_pick_the_first_of_tied_maxima_as_argmax():
    g = torch.Generator().manual_seed(0)
    # few distinct values, so every row has ties; one row's maximum is the last column only
    logits = torch.randint(0, 4, (16, 49_152), generator=g).float()
    logits[3, -1] = 9.0
    logits[5, 7] = float("nan")  # NaN wins, as in argmax
    want = logits.argmax(dim=-1)
    assert want[3] == 49_151 and want[5] == 7
    assert torch.equal(greedy_tokens(logits), want)


def test_temperature_zero_rows_take_argmax_in_mixed_batch():
    vocab = 50
    logits = _random_logits(6, vocab, seed=0)
    greedy = SamplingParams(temperature=0.0, top_k=3, top_p=0.5, seed=7)  # filters irrelevant
    params = [
        greedy,
        SamplingParams(temperature=1.5),
        greedy,
        SamplingParams(temperature=0.8, top_p=0.9),
        greedy,
        SamplingParams(temperature=2.0, seed=3),
    ]
    expected = logits.argmax(dim=-1)
    for sampler_seed in range(5):
        out = Sampler(vocab, CPU, seed=sampler_seed).sample(logits, _states(params, vocab))
        for row in (0, 2, 4):
            assert out.token_ids[row] == int(expected[row])


# ---------------------------------------------------------------- the sampled distribution


def test_sampling_probs_is_softmax_of_logits_over_temperature():
    vocab = 40
    temps = [0.25, 0.7, 1.0, 1.9, 4.0]
    logits = _random_logits(len(temps), vocab, seed=1)
    got = sampling_probs(logits, [SamplingParams(temperature=t) for t in temps])
    expected = torch.stack([(logits[i].double() / t).softmax(-1) for i, t in enumerate(temps)])
    torch.testing.assert_close(got, expected.float(), **PROB_TOL)


def test_top_k_keeps_exactly_the_k_largest_renormalized():
    vocab = 20
    g = torch.Generator().manual_seed(2)
    logits = torch.stack([torch.randperm(vocab, generator=g).float() * 0.3 for _ in range(4)])
    ks = [1, 2, 5, 19]
    got = sampling_probs(logits, [SamplingParams(top_k=k) for k in ks])
    for row, k in enumerate(ks):
        top = set(logits[row].topk(k).indices.tolist())
        assert set(got[row].nonzero().flatten().tolist()) == top
        expected = logits[row].masked_fill(
            ~torch.isin(torch.arange(vocab), torch.tensor(sorted(top))), float("-inf")
        )
        torch.testing.assert_close(got[row], expected.softmax(-1), **PROB_TOL)


@pytest.mark.parametrize("disabled", [-1, 0])
def test_top_k_minus_one_or_zero_is_disabled(disabled):
    vocab = 30
    logits = _random_logits(2, vocab, seed=3, scale=1.0)
    # the second row makes the batch take the top-k path; the first row must stay untouched
    got = sampling_probs(logits, [SamplingParams(top_k=disabled), SamplingParams(top_k=2)])
    torch.testing.assert_close(got[0], logits[0].softmax(-1), **PROB_TOL)


def test_top_k_at_least_vocab_is_disabled():
    vocab = 12
    logits = _random_logits(2, vocab, seed=4, scale=1.0)
    got = sampling_probs(logits, [SamplingParams(top_k=vocab), SamplingParams(top_k=vocab + 5)])
    torch.testing.assert_close(got, logits.softmax(-1), **PROB_TOL)


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.3, 1), (0.49, 1), (0.51, 2), (0.7, 2), (0.79, 2), (0.81, 3), (0.94, 3), (0.96, 4)],
)
def test_top_p_keeps_smallest_prefix_reaching_top_p(top_p, kept):
    # probs in vocab order, deliberately not sorted: descending order is 1, 3, 0, 2
    probs = [0.15, 0.5, 0.05, 0.3]
    by_prob = [1, 3, 0, 2]
    got = sampling_probs(_logits_from_probs(*probs), [SamplingParams(top_p=top_p)])
    torch.testing.assert_close(got[0], _renormalized(probs, by_prob[:kept]), **PROB_TOL)


def test_top_p_one_is_disabled():
    probs = [0.15, 0.5, 0.05, 0.3]
    got = sampling_probs(_logits_from_probs(*probs), [SamplingParams(top_p=1.0)])
    torch.testing.assert_close(got[0], torch.tensor(probs), **PROB_TOL)


def test_top_p_one_keeps_tiny_tokens_when_another_row_filters():
    logits = torch.tensor([[10.0, 0.0, -10.0], [10.0, 0.0, -10.0]])
    got = sampling_probs(logits, [SamplingParams(), SamplingParams(top_p=0.9)])
    assert got[0, 2] > 0
    torch.testing.assert_close(got[0], logits[0].softmax(-1), rtol=1e-5, atol=0.0)


def test_top_p_applies_to_top_k_renormalized_distribution():
    # top-3 renormalized: 0.444, 0.333, 0.222 -> mass before the third is 0.778 >= 0.75: keep 2.
    # (on the raw distribution the mass before the third is 0.7 < 0.75, which would keep 3)
    probs = [0.4, 0.3, 0.2, 0.1]
    got = sampling_probs(_logits_from_probs(*probs), [SamplingParams(top_k=3, top_p=0.75)])
    torch.testing.assert_close(got[0], _renormalized(probs, [0, 1]), **PROB_TOL)


@pytest.mark.parametrize(
    ("min_p", "kept"), [(0.05, [0, 1, 2, 3, 4]), (0.2, [0, 1, 2]), (0.6, [0, 1])]
)
def test_min_p_removes_tokens_below_min_p_times_max_prob(min_p, kept):
    # thresholds: 0.02 (keeps all), 0.08 (drops 0.06, 0.04), 0.24 (drops 0.2 too)
    probs = [0.4, 0.3, 0.2, 0.06, 0.04]
    got = sampling_probs(_logits_from_probs(*probs), [SamplingParams(min_p=min_p)])
    torch.testing.assert_close(got[0], _renormalized(probs, kept), **PROB_TOL)


def test_temperature_applies_before_top_p():
    # at T=0.5 the probs are 0.783, 0.196, 0.022: top_p 0.65 keeps one token
    # (on the T=1 distribution 0.6, 0.3, 0.1 it would keep two)
    logits = _logits_from_probs(0.6, 0.3, 0.1)
    got = sampling_probs(logits, [SamplingParams(temperature=0.5, top_p=0.65)])
    torch.testing.assert_close(got[0], torch.tensor([1.0, 0.0, 0.0]), **PROB_TOL)


def test_temperature_applies_before_min_p():
    # ratio to the max: exp(-1.5) = 0.22 at T=1, exp(-0.75) = 0.47 at T=2; min_p 0.3 keeps both
    logits = torch.tensor([[0.0, -1.5]])
    got = sampling_probs(logits, [SamplingParams(temperature=2.0, min_p=0.3)])
    torch.testing.assert_close(got[0], (logits[0] / 2.0).softmax(-1), **PROB_TOL)


def test_min_p_applies_after_top_p():
    # top_p 0.75 keeps 0.4, 0.3, 0.2 (mass before 0.2 is 0.7); min_p 0.3 then drops nothing more
    # (threshold 0.12 of the top-p distribution is the same ratio). Min-p first would drop 0.1
    # and, renormalized, top_p 0.75 would then keep only two tokens.
    probs = [0.4, 0.3, 0.2, 0.1]
    got = sampling_probs(_logits_from_probs(*probs), [SamplingParams(top_p=0.75, min_p=0.3)])
    torch.testing.assert_close(got[0], _renormalized(probs, [0, 1, 2]), **PROB_TOL)


def test_combined_filters_match_definition_in_order():
    vocab = 24
    params = [
        SamplingParams(temperature=0.6, top_k=10, top_p=0.8, min_p=0.1),
        SamplingParams(temperature=1.7, top_k=6, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=1.0, top_k=-1, top_p=0.6, min_p=0.2),
        SamplingParams(temperature=2.5, top_k=15, top_p=1.0, min_p=0.3),
        SamplingParams(temperature=0.9, top_k=4, top_p=0.5, min_p=0.0),
        SamplingParams(temperature=1.3),
    ]
    logits = _random_logits(len(params), vocab, seed=5)
    got = sampling_probs(logits, params)
    expected = torch.stack([_reference_probs(logits[i], p) for i, p in enumerate(params)])
    torch.testing.assert_close(got, expected, **PROB_TOL)


# ---------------------------------------------------------------- the draw


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05),
    ],
    ids=["plain", "filtered"],
)
def test_draw_frequencies_match_sampling_probs(params):
    vocab, draws = 8, 20_000
    row = torch.tensor([[1.0, 0.5, 0.2, 0.0, -0.3, -0.8, -1.5, -2.5]])
    expected = sampling_probs(row, [params])[0]
    out = Sampler(vocab, CPU, seed=1234).sample(
        row.expand(draws, vocab).contiguous(), _states([params] * draws, vocab)
    )
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=vocab).float() / draws
    assert (freq - expected).abs().max() < 0.02
    assert freq[expected == 0].sum() == 0  # filtered tokens are never drawn


# ---------------------------------------------------------------- per-request seeds


SEEDED_VOCAB = 32
SEEDED_STEPS = 12


def _seeded_run(seeded: SamplingParams, steps, sampler_seed: int) -> list[int]:
    """Tokens of the `seeded` row over len(steps) sampling steps. steps[s] is (params of the
    other rows, index of the seeded row among them) at step s. The seeded row's logits at step
    s are the same in every run; the other rows get different logits per batch size."""
    vocab = SEEDED_VOCAB
    state = SeqSamplingState.create(seeded, [], vocab, CPU)
    sampler = Sampler(vocab, CPU, seed=sampler_seed)
    tokens = []
    for step, (others, target) in enumerate(steps):
        states = _states(others, vocab)
        states.insert(target, state)
        logits = _random_logits(len(states), vocab, seed=1000 + 31 * step + len(states), scale=1.0)
        logits[target] = _random_logits(1, vocab, seed=step, scale=1.0)[0]
        tokens.append(sampler.sample(logits, states).token_ids[target])
    return tokens


SEEDED = SamplingParams(temperature=0.9, seed=42)
ALONE = [([], 0)] * SEEDED_STEPS


def test_seeded_row_gives_same_tokens_beside_other_rows():
    others = [SamplingParams(), SamplingParams(temperature=1.3, seed=7)]
    alone = _seeded_run(SEEDED, ALONE, sampler_seed=0)
    beside = _seeded_run(SEEDED, [(others, 1)] * SEEDED_STEPS, sampler_seed=1)
    assert alone == beside
    assert len(set(alone)) > 1  # the row really samples


def test_seeded_row_gives_same_tokens_as_batch_changes_between_steps():
    # greedy rows before it, seeded filtered rows and unseeded rows after it, sizes vary per step
    steps = [
        (
            [SamplingParams(temperature=0.0)] * (s % 3)
            + [SamplingParams(top_k=3, top_p=0.8, seed=s)] * (s % 4)
            + [SamplingParams(min_p=0.1)] * (s % 2),
            s % 3,
        )
        for s in range(SEEDED_STEPS)
    ]
    alone = _seeded_run(SEEDED, ALONE, sampler_seed=0)
    assert _seeded_run(SEEDED, steps, sampler_seed=99) == alone


def test_different_seeds_give_different_tokens():
    a = _seeded_run(SamplingParams(temperature=0.9, seed=42), ALONE, sampler_seed=0)
    b = _seeded_run(SamplingParams(temperature=0.9, seed=43), ALONE, sampler_seed=0)
    assert a != b
