"""Scheduler with no model: chunked prefill, order of service and pre-emption, checked on
plans answered with fabricated step results."""

from __future__ import annotations

from router.scheduling.scheduler import Scheduler
from router.scheduling.sequence import SeqStatus, Sequence
from shards.wire import ScheduledSeq, StepResult
from tests.support.scheduling import (
    _by_id,
    _check_blocks,
    _counting_tokens,
    _result,
    _run,
    _sched,
    _seq,
    _step,
)


def test_long_prompt_is_chunked_to_token_budget():
    sched = _sched(budget=16)
    sched.add(_seq(1, 50))
    plans = [_step(sched) for _ in range(4)]
    chunks = [(p.seqs[0].start_pos, len(p.seqs[0].token_ids)) for p in plans]
    assert chunks == [(0, 16), (16, 16), (32, 16), (48, 2)]


def test_sample_flag_only_on_last_prompt_chunk():
    sched = _sched(budget=16)
    sched.add(_seq(1, 50))
    flags = [_step(sched).seqs[0].sample for _ in range(5)]
    assert flags == [False, False, False, True, True]  # then a decode, which always samples


def test_prefill_chunk_does_not_sample_a_token():
    sched = _sched(budget=16)
    seq = _seq(1, 50)
    sched.add(seq)
    plan = sched.schedule()
    assert sched.update(plan, StepResult(plan.step_id, [])) == []
    assert seq.num_computed == 16
    assert seq.num_tokens == 50


def test_decodes_run_every_step_while_long_prompt_prefills():
    sched = _sched(budget=8)
    sched.add(_seq(1, 3, max_tokens=50))
    sched.add(_seq(2, 3, max_tokens=50))
    _step(sched)  # both prompts in one step; both now decode
    sched.add(_seq(3, 60))
    long_chunks = []
    while True:
        plan = _step(sched)
        seqs = _by_id(plan)
        assert len(seqs[1].token_ids) == 1 and len(seqs[2].token_ids) == 1
        assert plan.num_tokens <= 8
        long_chunks.append(len(seqs[3].token_ids))
        if seqs[3].sample:
            break
    assert sum(long_chunks) == 60
    assert max(long_chunks) == 6  # what the two decodes leave of the budget


def test_prompt_chunk_shrinks_to_free_blocks_instead_of_preempting():
    sched = _sched(num_blocks=4, budget=9, max_model_len=16)
    sched.add(_seq(1, 3))  # 1 block
    sched.add(_seq(2, 15))
    plan = _step(sched)
    assert [len(s.token_ids) for s in plan.seqs] == [3, 6]  # seq 2 holds 2 blocks, 1 free
    plan = sched.schedule()
    # The budget leaves 8 tokens for seq 2, but its 2 blocks + the free one hold only 6 more.
    assert [(s.seq_id, len(s.token_ids)) for s in plan.seqs] == [(1, 1), (2, 6)]
    assert sched.num_preemptions == 0
    assert sched.allocator.num_free == 0


def test_waiting_seqs_admitted_first_come_first_served():
    sched = _sched(max_seqs=2)
    for i in range(1, 6):
        sched.add(_seq(i, 5, max_tokens=1 + i))
    order = []
    for plan in _run(sched):
        order += [s.seq_id for s in plan.seqs if s.seq_id not in order]
    assert order == [1, 2, 3, 4, 5]


def test_admission_waits_behind_head_that_does_not_fit():
    sched = _sched(num_blocks=8, max_model_len=32)
    sched.add(_seq(1, 19, max_tokens=2))  # 5 blocks
    _step(sched)
    sched.add(_seq(2, 20))  # needs 5 blocks, 3 free
    sched.add(_seq(3, 2))  # would fit, but arrived later
    plan = sched.schedule()
    assert [s.seq_id for s in plan.seqs] == [1]
    assert [s.seq_id for s in sched.waiting] == [2, 3]


def test_running_seqs_capped_at_max_num_seqs():
    sched = _sched(max_seqs=2)
    for i in range(1, 6):
        sched.add(_seq(i, 5))
    plan = _step(sched)
    assert [s.seq_id for s in plan.seqs] == [1, 2]
    assert sched.num_running == 2
    assert sched.num_waiting == 3


def test_admission_respects_watermark_blocks():
    sched = _sched(num_blocks=8, max_model_len=32, watermark=2)
    sched.add(_seq(1, 7, max_tokens=4))  # 2 blocks
    _step(sched)
    sched.add(_seq(2, 20, max_tokens=1))  # 5 blocks; 6 free but 2 are held back
    sched.add(_seq(3, 4, max_tokens=1))
    plan = _step(sched)
    assert [s.seq_id for s in plan.seqs] == [1]
    assert sched.seqs[2].status is SeqStatus.WAITING
    _run(sched)
    assert sched.allocator.num_used == 0


def test_watermark_does_not_hold_back_a_prompt_when_nothing_runs():
    sched = _sched(num_blocks=4, max_model_len=16, watermark=1)
    seq = _seq(1, 15, max_tokens=1)  # 4 blocks: the whole cache
    sched.add(seq)
    plan = sched.schedule()
    assert plan is not None and [s.seq_id for s in plan.seqs] == [1]
    assert len(seq.block_ids) == 4


# -- pre-emption ---------------------------------------------------------------------------------


def _two_seqs_that_outgrow_the_cache() -> tuple[Scheduler, Sequence, Sequence]:
    """6 blocks of 4 tokens; two 11-token prompts fill them; the first decode past 12 tokens
    needs a seventh block."""
    sched = _sched(num_blocks=6, max_model_len=24)
    a, b = _seq(1, 11, max_tokens=10), _seq(2, 11, max_tokens=10)
    sched.add(a)
    sched.add(b)
    _step(sched, _counting_tokens)  # prefill both: 12 tokens each, 6 blocks used
    _step(sched, _counting_tokens)  # decode both: 13 tokens each
    assert sched.allocator.num_free == 0
    return sched, a, b


def test_preemption_evicts_newest_running_seq():
    sched, a, b = _two_seqs_that_outgrow_the_cache()
    plan = sched.schedule()
    assert [s.seq_id for s in plan.seqs] == [1]
    assert sched.running == [a]
    assert list(sched.waiting) == [b]
    assert b.status is SeqStatus.WAITING
    assert (b.num_computed, b.block_ids, b.num_preemptions) == (0, [], 1)
    assert sched.num_preemptions == 1
    assert len(a.block_ids) == 4
    assert sched.allocator.num_free == 2  # b's three blocks went back
    _check_blocks(sched)


def test_preempted_seq_goes_to_head_of_waiting_queue():
    sched, a, b = _two_seqs_that_outgrow_the_cache()
    c = _seq(3, 2)
    sched.add(c)
    sched.schedule()
    assert list(sched.waiting) == [b, c]


def test_preempted_seq_resumes_and_finishes():
    sched, a, b = _two_seqs_that_outgrow_the_cache()
    _run(sched, _counting_tokens)
    assert b.num_preemptions >= 1
    for seq in (a, b):
        assert seq.finish_reason == "length"
        assert seq.output_token_ids == list(range(100, 110))  # nothing lost or repeated
    assert sched.allocator.num_used == 0


def _step_until_resumed(sched: Scheduler, seq: Sequence) -> ScheduledSeq:
    """Step until the pre-empted `seq` is scheduled again; its chunk in that step."""
    _step(sched, _counting_tokens)  # the step that pre-empts it
    assert seq.status is SeqStatus.WAITING
    while True:
        plan = sched.schedule()
        if seq.seq_id in _by_id(plan):
            return _by_id(plan)[seq.seq_id]
        sched.update(plan, _result(sched, plan, _counting_tokens))


def test_resumed_seq_recomputes_its_generated_tokens_from_cached_prefix():
    sched, a, b = _two_seqs_that_outgrow_the_cache()
    s = _step_until_resumed(sched, b)
    # Its first full block survived in the prefix cache (tail blocks were evicted first).
    assert s.start_pos == 4
    assert s.token_ids == b.token_ids[4:]  # prompt tail and both generated tokens
    assert b.output_token_ids == [100, 101]
    assert s.sample


def test_resumed_seq_keeps_cached_prompt_tokens_of_first_admission():
    sched, a, b = _two_seqs_that_outgrow_the_cache()
    s = _step_until_resumed(sched, b)
    assert s.start_pos > 0  # a cache hit on resume ...
    assert b.num_cached_prompt_tokens == 0  # ... is not a prompt-cache hit for the request


def test_new_seq_not_sent_again_after_preemption():
    sched, a, b = _two_seqs_that_outgrow_the_cache()
    plans = _run(sched, _counting_tokens)
    assert b.num_preemptions >= 1
    assert all(n.seq_id not in (1, 2) for p in plans for n in p.new_seqs)


def test_preemption_is_not_reported_as_finished():
    sched, a, b = _two_seqs_that_outgrow_the_cache()
    plan = sched.schedule()
    assert b.status is SeqStatus.WAITING
    assert plan.finished_seq_ids == []
