"""The sampler's penalties (OpenAI presence/frequency, transformers repetition) against their
formulas, and the logprobs it returns."""

from __future__ import annotations

import pytest
import torch

from shards.sampler import Sampler, SeqSamplingState, apply_penalties
from shards.wire import SamplingParams
from tests.shards.test_sampler import CPU, _random_logits, _states

# ---------------------------------------------------------------- penalties


def _penalty_state(params: SamplingParams, prompt: list[int], counts: dict[int, int], vocab: int):
    state = SeqSamplingState.create(params, prompt, vocab, CPU)
    for token, n in counts.items():
        state.output_counts[token] = n
    return state


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -1.0, 3.0, -0.5, 1.0, -2.0, 0.0]])
    # prompt: 0 (positive), 1 (negative); generated: 2 (positive), 3 (negative, twice)
    state = _penalty_state(SamplingParams(repetition_penalty=2.0), [0, 1], {2: 1, 3: 2}, 7)
    got = apply_penalties(logits, [state])
    expected = torch.tensor([[1.0, -2.0, 1.5, -1.0, 1.0, -2.0, 0.0]])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    logits = torch.tensor([[2.0, -1.0, 3.0, -0.5, 1.0]])
    # prompt holds 0 and 2; generated: 2 once, 3 three times, 4 never
    params = SamplingParams(frequency_penalty=0.25, presence_penalty=0.5)
    state = _penalty_state(params, [0, 2], {2: 1, 3: 3}, 5)
    got = apply_penalties(logits, [state])
    expected = torch.tensor([[2.0, -1.0, 3.0 - 0.25 - 0.5, -0.5 - 0.75 - 0.5, 1.0]])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_repetition_penalty_applies_before_frequency_and_presence():
    logits = torch.tensor([[4.0, -1.0, 2.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=1.0)
    state = _penalty_state(params, [2], {0: 2, 1: 1}, 3)
    got = apply_penalties(logits, [state])
    expected = torch.tensor([[4.0 / 2 - 1.0 - 1.0, -1.0 * 2 - 0.5 - 1.0, 2.0 / 2]])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_penalties_leave_other_rows_and_input_unchanged():
    logits = _random_logits(3, 6, seed=6)
    before = logits.clone()
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.5), SamplingParams()]
    states = _states(params, 6, prompts=[[], [0, 1, 2, 3, 4, 5], []])
    got = apply_penalties(logits, states)
    torch.testing.assert_close(logits, before, rtol=0, atol=0)
    torch.testing.assert_close(got[[0, 2]], before[[0, 2]], rtol=0, atol=0)
    assert not torch.equal(got[1], before[1])


def test_sample_increments_output_counts_of_sampled_token():
    vocab = 10
    logits = _random_logits(2, vocab, seed=7)
    params = [
        SamplingParams(temperature=0.0, frequency_penalty=0.1),
        SamplingParams(temperature=1.0, presence_penalty=0.1),
    ]
    states = _states(params, vocab, prompts=[[1, 2], [3]])
    sampler = Sampler(vocab, CPU, seed=0)
    seen = [[], []]
    for _ in range(5):
        out = sampler.sample(logits, states)
        for row, token in enumerate(out.token_ids):
            seen[row].append(token)
    for row, state in enumerate(states):
        expected = torch.bincount(torch.tensor(seen[row]), minlength=vocab).to(torch.int32)
        torch.testing.assert_close(state.output_counts, expected, rtol=0, atol=0)


def test_sample_penalizes_tokens_it_generated_before():
    # greedy with a frequency penalty of 1.5: token 0 wins, then is penalized below token 1
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    state = SeqSamplingState.create(
        SamplingParams(temperature=0.0, frequency_penalty=1.5), [], 3, CPU
    )
    sampler = Sampler(3, CPU, seed=0)
    tokens = [sampler.sample(logits, [state]).token_ids[0] for _ in range(3)]
    assert tokens == [0, 1, 0]  # 3-1.5=1.5 < 2; then 2-1.5=0.5 < 1.5


# ---------------------------------------------------------------- logprobs


def test_chosen_logprob_is_of_raw_logits_before_penalties_and_temperature():
    vocab = 16
    logits = _random_logits(3, vocab, seed=8)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=3.0, logprobs=0),
        SamplingParams(temperature=0.4, top_k=4, frequency_penalty=1.0, logprobs=2),
        SamplingParams(temperature=1.8, logprobs=5),
    ]
    top = int(logits[0].argmax())
    states = _states(params, vocab, prompts=[[top], [], []])  # penalizes row 0's argmax
    states[1].output_counts[logits[1].argmax()] = 3
    out = Sampler(vocab, CPU, seed=0).sample(logits, states)
    raw = logits.double().log_softmax(-1)
    expected = [float(raw[row, t]) for row, t in enumerate(out.token_ids)]
    torch.testing.assert_close(
        torch.tensor(out.logprobs), torch.tensor(expected), rtol=1e-5, atol=1e-5
    )


def test_top_logprobs_lists_k_best_in_descending_order():
    vocab = 16
    logits = _random_logits(2, vocab, seed=9)
    params = [
        SamplingParams(temperature=0.7, presence_penalty=2.0, logprobs=3),
        SamplingParams(temperature=0.0, logprobs=6),
    ]
    out = Sampler(vocab, CPU, seed=0).sample(logits, _states(params, vocab))
    raw = logits.double().log_softmax(-1)
    for row, k in enumerate([3, 6]):
        entries = out.top_logprobs[row]
        ids = [i for i, _ in entries]
        values = torch.tensor([v for _, v in entries], dtype=torch.float64)
        assert ids == raw[row].topk(k).indices.tolist()
        assert bool((values[:-1] >= values[1:]).all())
        torch.testing.assert_close(values, raw[row, ids], rtol=1e-5, atol=1e-5)


def test_rows_without_logprobs_get_no_top_logprobs():
    vocab = 8
    logits = _random_logits(3, vocab, seed=10)
    params = [SamplingParams(), SamplingParams(logprobs=2), SamplingParams(temperature=0.0)]
    out = Sampler(vocab, CPU, seed=0).sample(logits, _states(params, vocab))
    assert out.top_logprobs[0] is None
    assert out.top_logprobs[2] is None
    assert len(out.top_logprobs[1]) == 2


def test_logprobs_zero_returns_chosen_logprob_without_top_list():
    vocab = 8
    logits = _random_logits(1, vocab, seed=11)
    out = Sampler(vocab, CPU, seed=0).sample(logits, _states([SamplingParams(logprobs=0)], vocab))
    expected = float(logits[0].double().log_softmax(-1)[out.token_ids[0]])
    assert out.logprobs[0] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert not out.top_logprobs[0]


def test_no_logprobs_when_no_row_asks():
    vocab = 8
    logits = _random_logits(2, vocab, seed=12)
    params = [SamplingParams(), SamplingParams(temperature=0.0)]
    out = Sampler(vocab, CPU, seed=0).sample(logits, _states(params, vocab))
    assert out.logprobs is None
    assert out.top_logprobs is None
