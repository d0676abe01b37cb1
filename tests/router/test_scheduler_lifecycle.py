"""Scheduler with no model: abort, finishing, prefix cache and announcing sequences."""

from __future__ import annotations

import pytest

from router.scheduling.sequence import SeqStatus
from shards.wire import SamplingParams, SeqOutput, StepResult
from tests.support.scheduling import (
    EOS,
    TOKEN,
    _by_id,
    _result,
    _run,
    _sched,
    _seq,
    _step,
)


def test_abort_frees_blocks_immediately():
    sched = _sched(num_blocks=16)
    seq = _seq(1, 10)
    sched.add(seq)
    _step(sched)
    assert sched.allocator.num_free == 13
    assert sched.abort(1) is seq
    assert sched.allocator.num_free == 16
    assert seq.block_ids == []
    assert (seq.status, seq.finish_reason) == (SeqStatus.FINISHED, "abort")
    assert not sched.has_unfinished()


def test_aborted_announced_seq_reported_in_next_plan():
    sched = _sched()
    sched.add(_seq(1, 10))
    _step(sched)
    sched.abort(1)
    plan = sched.schedule()
    assert plan is not None and plan.seqs == []
    assert plan.finished_seq_ids == [1]
    assert sched.schedule() is None  # reported once


def test_aborted_seq_never_scheduled_is_not_reported():
    sched = _sched(max_seqs=1)
    sched.add(_seq(1, 10))
    sched.add(_seq(2, 10))
    _step(sched)
    sched.abort(2)
    plan = sched.schedule()
    assert 2 not in plan.finished_seq_ids
    assert [s.seq_id for s in plan.seqs] == [1]


def test_abort_while_step_runs_ignores_its_result():
    sched = _sched(num_blocks=16)
    sched.add(_seq(1, 10))
    plan = sched.schedule()
    sched.abort(1)
    result = StepResult(plan.step_id, [SeqOutput(1, [TOKEN])])
    assert sched.update(plan, result) == []
    assert sched.allocator.num_free == 16


def test_abort_records_the_given_finish_reason():
    sched = _sched()
    seq = _seq(1, 10)
    sched.add(seq)
    _step(sched)
    sched.abort(1, reason="stop")  # e.g. a stop string found by the detokenizer
    assert seq.finish_reason == "stop"
    assert sched.schedule().finished_seq_ids == [1]


def test_abort_of_waiting_seq_removes_it_from_queue():
    sched = _sched(max_seqs=1)
    sched.add(_seq(1, 10))
    sched.add(_seq(2, 10))
    sched.add(_seq(3, 10))
    _step(sched)
    sched.abort(2)
    assert [s.seq_id for s in sched.waiting] == [3]


def test_abort_of_unknown_or_finished_seq_is_noop():
    sched = _sched()
    sched.add(_seq(1, 3, max_tokens=1))
    _run(sched)
    assert sched.abort(1) is None
    assert sched.abort(99) is None


# -- finishing -----------------------------------------------------------------------------------


def test_finished_seq_frees_all_blocks_and_is_reported_next_plan():
    sched = _sched(num_blocks=16)
    sched.add(_seq(1, 10, max_tokens=3))
    plans = _run(sched)
    assert sched.allocator.num_free == 16
    assert sched.schedule().finished_seq_ids == [1]
    assert all(p.finished_seq_ids == [] for p in plans)


def test_eos_token_finishes_with_stop():
    sched = _sched(eos=(EOS, 3))
    seq = _seq(1, 4)
    sched.add(seq)
    _run(sched, lambda s: 3 if s.num_output_tokens == 2 else TOKEN)
    assert seq.finish_reason == "stop"
    assert seq.output_token_ids == [TOKEN, TOKEN, 3]  # the stop token is kept


def test_ignore_eos_generates_past_eos_until_max_tokens():
    sched = _sched()
    seq = _seq(1, 4, max_tokens=5, ignore_eos=True)
    sched.add(seq)
    _run(sched, EOS)
    assert seq.finish_reason == "length"
    assert seq.output_token_ids == [EOS] * 5


def test_stop_token_id_finishes_with_stop_even_with_ignore_eos():
    sched = _sched()
    seq = _seq(1, 4, stop_token_ids=(77,), ignore_eos=True)
    sched.add(seq)
    _run(sched, lambda s: 77 if s.num_output_tokens == 1 else TOKEN)
    assert seq.finish_reason == "stop"
    assert seq.output_token_ids == [TOKEN, 77]


def test_max_tokens_finishes_with_length():
    sched = _sched()
    seq = _seq(1, 4, max_tokens=7)
    sched.add(seq)
    finished = []
    while sched.has_unfinished():
        plan = sched.schedule()
        finished += [u.finished for u in sched.update(plan, _result(sched, plan))]
    assert seq.finish_reason == "length"
    assert seq.num_output_tokens == 7
    assert finished == [False] * 6 + [True]


def test_max_model_len_finishes_with_length():
    sched = _sched(max_model_len=12)
    seq = _seq(1, 9, max_tokens=100)
    sched.add(seq)
    _run(sched)
    assert seq.finish_reason == "length"
    assert seq.num_tokens == 12


def test_prompt_of_max_model_len_tokens_is_rejected():
    sched = _sched(max_model_len=12)
    with pytest.raises(ValueError):
        sched.add(_seq(1, 12))
    sched.add(_seq(2, 11))  # one below the limit leaves room for one token
    assert sched.num_waiting == 1


def test_empty_prompt_is_rejected():
    with pytest.raises(ValueError):
        _sched().add(_seq(1, []))


# -- prefix cache --------------------------------------------------------------------------------


PROMPT = list(range(200, 218))  # 18 tokens: 4 full blocks of 4 and 2 more


def test_same_prompt_reuses_cached_full_blocks():
    sched = _sched()
    a, b = _seq(1, PROMPT), _seq(2, PROMPT)
    sched.add(a)
    _step(sched)  # a's prompt computed and committed
    sched.add(b)
    plan = sched.schedule()
    s = _by_id(plan)[2]
    assert (s.start_pos, len(s.token_ids)) == (16, 2)
    assert b.num_cached_prompt_tokens == 16
    assert s.block_table[:4] == a.block_ids[:4]
    assert all(sched.allocator.ref_count(x) == 2 for x in a.block_ids[:4])
    assert a.num_cached_prompt_tokens == 0


def test_prefix_hit_never_covers_whole_prompt():
    sched = _sched()
    prompt = PROMPT[:16]  # exactly four full blocks
    sched.add(_seq(1, prompt))
    _step(sched)
    b = _seq(2, prompt)
    sched.add(b)
    s = _by_id(sched.schedule())[2]
    assert (s.start_pos, len(s.token_ids), s.sample) == (12, 4, True)
    assert b.num_cached_prompt_tokens == 12


def test_prefix_cache_survives_first_seq_finishing():
    sched = _sched(num_blocks=32)
    sched.add(_seq(1, PROMPT, max_tokens=2))
    _run(sched)
    assert sched.allocator.num_used == 0
    b = _seq(2, PROMPT)
    sched.add(b)
    s = _by_id(sched.schedule())[2]
    assert s.start_pos == 16
    assert b.num_cached_prompt_tokens == 16


def test_shared_prefix_hit_stops_at_first_differing_block():
    sched = _sched()
    sched.add(_seq(1, PROMPT))
    _step(sched)
    other = PROMPT[:9] + [999] + PROMPT[10:]  # differs inside the third block
    b = _seq(2, other)
    sched.add(b)
    s = _by_id(sched.schedule())[2]
    assert s.start_pos == 8
    assert s.token_ids == other[8:]


def test_prompt_sharing_starts_only_after_blocks_are_computed():
    sched = _sched()
    sched.add(_seq(1, PROMPT))
    sched.add(_seq(2, PROMPT))  # admitted in the same step: nothing is cached yet
    plan = sched.schedule()
    assert [s.start_pos for s in plan.seqs] == [0, 0]


def test_prefix_caching_disabled_recomputes_whole_prompt():
    sched = _sched(prefix_caching=False)
    sched.add(_seq(1, PROMPT))
    _step(sched)
    b = _seq(2, PROMPT)
    sched.add(b)
    s = _by_id(sched.schedule())[2]
    assert (s.start_pos, len(s.token_ids)) == (0, 18)
    assert b.num_cached_prompt_tokens == 0


# -- announcing sequences to the shard ---------------------------------------------------------


def test_new_seq_carries_prompt_only_when_repetition_penalty_needs_it():
    sched = _sched()
    sched.add(_seq(1, [5, 6, 7], sampling=SamplingParams(repetition_penalty=1.2)))
    sched.add(_seq(2, [5, 6, 7], sampling=SamplingParams(presence_penalty=0.5)))
    plan = sched.schedule()
    new = {n.seq_id: n for n in plan.new_seqs}
    assert new[1].prompt_token_ids == [5, 6, 7]
    assert new[1].sampling.repetition_penalty == 1.2
    assert new[2].prompt_token_ids == []
