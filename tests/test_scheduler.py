"""Scheduler with no model: plans are checked, then answered with fabricated step results
(one token per sequence whose chunk asks for a sample)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from router.block_allocator import BlockAllocator
from router.params import GenerationParams
from router.scheduler import Scheduler, SchedulerConfig
from router.sequence import SeqStatus, Sequence
from shards.wire import SamplingParams, ScheduledSeq, SeqOutput, StepPlan, StepResult

EOS = 2
TOKEN = 50  # an ordinary output token

TokenFn = Callable[[Sequence], int]


def _sched(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    budget: int = 64,
    max_seqs: int = 8,
    max_model_len: int = 128,
    eos: tuple[int, ...] = (EOS,),
    prefix_caching: bool = True,
    watermark: int = 0,
) -> Scheduler:
    config = SchedulerConfig(budget, max_seqs, max_model_len, eos, watermark)
    return Scheduler(config, BlockAllocator(num_blocks, block_size, prefix_caching))


def _seq(seq_id: int, prompt: int | list[int], max_tokens: int = 16, **kw) -> Sequence:
    """A sequence; an int prompt is that many tokens unique to this sequence."""
    if isinstance(prompt, int):
        prompt = [1000 * seq_id + i for i in range(prompt)]
    return Sequence(seq_id, f"req-{seq_id}", list(prompt), GenerationParams(max_tokens, **kw))


def _result(sched: Scheduler, plan: StepPlan, token: int | TokenFn = TOKEN) -> StepResult:
    """What a shard answers: one token per chunk that samples (aborted sequences included)."""
    pick = token if callable(token) else (lambda seq: token)
    outputs = []
    for s in plan.seqs:
        if s.sample:
            seq = sched.seqs.get(s.seq_id)  # None if aborted while the step ran
            outputs.append(SeqOutput(s.seq_id, [pick(seq) if seq is not None else TOKEN]))
    return StepResult(plan.step_id, outputs)


def _step(sched: Scheduler, token: int | TokenFn = TOKEN) -> StepPlan | None:
    plan = sched.schedule()
    if plan is not None:
        sched.update(plan, _result(sched, plan, token))
    return plan


def _run(sched: Scheduler, token: int | TokenFn = TOKEN, max_steps: int = 10_000) -> list[StepPlan]:
    plans = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        plan = _step(sched, token)
        if plan is not None:
            plans.append(plan)
    assert not sched.has_unfinished(), "no progress"
    return plans


def _by_id(plan: StepPlan) -> dict:
    return {s.seq_id: s for s in plan.seqs}


def _counting_tokens(seq: Sequence) -> int:
    """Output token k of a sequence is 100 + k: order and loss of outputs are visible."""
    return 100 + seq.num_output_tokens


def _check_blocks(sched: Scheduler) -> None:
    """Distinct blocks held by running sequences + free blocks == all blocks; a block's reference
    count is the number of running sequences that hold it; nobody else holds a block."""
    alloc = sched.allocator
    holders: Counter[int] = Counter()
    for seq in sched.running:
        assert len(set(seq.block_ids)) == len(seq.block_ids), "a block twice in one table"
        holders.update(seq.block_ids)
    for seq in sched.waiting:
        assert seq.block_ids == []
    assert len(holders) + alloc.num_free == alloc.num_blocks
    for b in range(1, alloc.num_blocks + 1):
        assert alloc.ref_count(b) == holders[b], f"block {b}"


# -- random workloads ---------------------------------------------------------------------------


def _workload(rng: random.Random) -> tuple[Scheduler, dict[int, list[Sequence]]]:
    bs = rng.choice([1, 2, 4, 8])
    max_model_len = rng.randrange(4, 80)
    min_blocks = -(-max_model_len // bs)  # the shard guarantees one full-length sequence fits
    sched = _sched(
        num_blocks=rng.randrange(min_blocks, 4 * min_blocks + 1),
        block_size=bs,
        budget=rng.randrange(1, 64),
        max_seqs=rng.randrange(1, 9),
        max_model_len=max_model_len,
        prefix_caching=rng.random() < 0.8,
    )
    # A few shared prefixes and a small vocabulary, so the prefix cache gets hits.
    prefixes = [[rng.randrange(10, 14) for _ in range(max_model_len)] for _ in range(3)]
    arrivals: dict[int, list[Sequence]] = {}
    for seq_id in range(1, rng.randrange(2, 16)):
        n = rng.randrange(1, max_model_len)
        shared = rng.randrange(0, n + 1)
        prompt = rng.choice(prefixes)[:shared] + [rng.randrange(10, 14) for _ in range(n - shared)]
        params = {"max_tokens": rng.randrange(1, 30), "ignore_eos": rng.random() < 0.3}
        seq = _seq(seq_id, prompt, **params)
        arrivals.setdefault(rng.randrange(0, 25), []).append(seq)
    return sched, arrivals


def _simulate(
    seed: int, abort_rate: float = 0.0
) -> Iterator[tuple[str, Scheduler, StepPlan | None]]:
    """Run one random workload; yield ("plan", ...) after each schedule() and ("update", ...)
    after each update(), with random arrivals and (optionally) random aborts in between."""
    rng = random.Random(seed)
    sched, arrivals = _workload(rng)

    def token(seq: Sequence) -> int:
        return EOS if rng.random() < 0.05 else rng.randrange(10, 14)

    step = 0
    while arrivals or sched.has_unfinished():
        assert step < 5000, f"seed {seed}: no progress"
        for seq in arrivals.pop(step, []):
            sched.add(seq)
        if sched.seqs and rng.random() < abort_rate:
            sched.abort(rng.choice(list(sched.seqs)))
        plan = sched.schedule()
        yield "plan", sched, plan
        if plan is not None:
            if sched.seqs and rng.random() < abort_rate:  # aborted while the step runs
                sched.abort(rng.choice(list(sched.seqs)))
            sched.update(plan, _result(sched, plan, token))
            yield "update", sched, plan
        step += 1
    yield "plan", sched, sched.schedule()  # the last finished ids go out with one more plan


SEEDS = range(300)


def test_step_tokens_never_exceed_budget():
    for seed in SEEDS:
        for phase, sched, plan in _simulate(seed):
            if phase == "plan" and plan is not None:
                assert plan.num_tokens <= sched.config.max_num_batched_tokens, f"seed {seed}"
                assert all(s.token_ids for s in plan.seqs), f"seed {seed}: empty chunk"


def test_running_seqs_never_exceed_max_num_seqs():
    for seed in SEEDS:
        for _, sched, plan in _simulate(seed):
            assert sched.num_running <= sched.config.max_num_seqs, f"seed {seed}"
            if plan is not None:
                assert len(plan.seqs) <= sched.config.max_num_seqs, f"seed {seed}"


def test_block_tables_cover_scheduled_tokens():
    for seed in SEEDS:
        for phase, sched, plan in _simulate(seed):
            if phase != "plan" or plan is None:
                continue
            bs = sched.block_size
            for s in plan.seqs:
                seq = sched.seqs[s.seq_id]
                end = s.start_pos + len(s.token_ids)
                assert s.start_pos == seq.num_computed, f"seed {seed}"
                assert s.token_ids == seq.token_ids[s.start_pos : end], f"seed {seed}"
                assert len(s.block_table) == -(-end // bs), f"seed {seed}"
                assert s.block_table == seq.block_ids, f"seed {seed}"
                assert 0 not in s.block_table, f"seed {seed}: null block handed out"


def test_sample_flag_set_exactly_when_chunk_reaches_end_of_known_tokens():
    for seed in SEEDS:
        for phase, sched, plan in _simulate(seed):
            if phase == "plan" and plan is not None:
                for s in plan.seqs:
                    seq = sched.seqs[s.seq_id]
                    reaches_end = s.start_pos + len(s.token_ids) == seq.num_tokens
                    assert s.sample == reaches_end, f"seed {seed}"


def test_no_preemption_when_cache_holds_every_running_seq():
    for seed in SEEDS:
        rng = random.Random(seed)
        sched, arrivals = _workload(rng)
        cfg, bs = sched.config, sched.block_size
        enough = cfg.max_num_seqs * -(-cfg.max_model_len // bs)
        sched.allocator = BlockAllocator(enough, bs, sched.allocator.enable_prefix_caching)
        for seqs in arrivals.values():
            for seq in seqs:
                sched.add(seq)
        _run(sched, lambda seq, rng=rng: rng.randrange(10, 14))
        assert sched.num_preemptions == 0, f"seed {seed}"


def test_block_conservation_with_random_aborts():
    for seed in SEEDS:
        for _, sched, _ in _simulate(seed, abort_rate=0.1):
            try:
                _check_blocks(sched)
            except AssertionError as e:
                raise AssertionError(f"seed {seed}: {e}") from e


def test_cached_and_resumed_blocks_hold_the_kv_a_seq_attends_to():
    """A fake paged KV cache: each step writes, at every position of a chunk and through its
    block table, what real K/V depends on (the token, its position and its whole prefix). Every
    position before a chunk must then hold the sequence's own K/V, so prefix-cache hits, revived
    blocks and pre-emption never hand out foreign or stale entries."""
    for seed in SEEDS:
        kv: dict[int, dict[int, tuple[int, ...]]] = {}
        for phase, sched, plan in _simulate(seed, abort_rate=0.05):
            if phase != "plan" or plan is None:
                continue
            bs = sched.block_size
            for s in plan.seqs:
                tokens = sched.seqs[s.seq_id].token_ids
                for pos in range(s.start_pos):
                    held = kv.get(s.block_table[pos // bs], {}).get(pos % bs)
                    assert held == tuple(tokens[: pos + 1]), f"seed {seed}: position {pos}"
            for s in plan.seqs:
                tokens = sched.seqs[s.seq_id].token_ids
                for pos in range(s.start_pos, s.start_pos + len(s.token_ids)):
                    kv.setdefault(s.block_table[pos // bs], {})[pos % bs] = tuple(tokens[: pos + 1])


def test_all_blocks_free_after_every_workload_completes():
    for seed in SEEDS:
        *_, (_, sched, _) = _simulate(seed, abort_rate=0.05)
        assert sched.allocator.num_used == 0, f"seed {seed}"
        assert sched.seqs == {} and not sched.running and not sched.waiting, f"seed {seed}"


def test_new_seq_sent_once_and_finished_ids_sent_once_per_announced_seq():
    for seed in SEEDS:
        announced: Counter[int] = Counter()
        finished: Counter[int] = Counter()
        scheduled: set[int] = set()
        for phase, _, plan in _simulate(seed, abort_rate=0.05):
            if phase != "plan" or plan is None:
                continue
            new_ids = {n.seq_id for n in plan.new_seqs}
            # A sequence is announced in the plan that first schedules it.
            assert new_ids == {s.seq_id for s in plan.seqs} - scheduled, f"seed {seed}"
            scheduled |= new_ids
            announced.update(new_ids)
            finished.update(plan.finished_seq_ids)
        assert set(announced.values()) <= {1}, f"seed {seed}"
        assert finished == announced, f"seed {seed}"


# -- chunked prefill and order of service ------------------------------------------------------


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


# -- abort ---------------------------------------------------------------------------------------


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
