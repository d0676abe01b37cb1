"""Scheduler invariants over many random workloads (budgets, caps, blocks, prefix cache)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

from router.scheduling.block_allocator import BlockAllocator
from router.scheduling.scheduler import Scheduler
from router.scheduling.sequence import Sequence
from shards.wire import StepPlan
from tests.support.scheduling import (
    EOS,
    _check_blocks,
    _result,
    _run,
    _sched,
    _seq,
)


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
