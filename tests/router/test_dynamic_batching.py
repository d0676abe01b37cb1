"""The DeepSpeed image's dynamic batching (router/scheduling/dynamic_batching.py), with no model:
batches form when full or when their first request has waited BATCH_WAIT_TIMEOUT, and run to
completion before the next forms."""

from __future__ import annotations

from router.scheduling.block_allocator import BlockAllocator
from router.scheduling.dynamic_batching import DynamicBatchScheduler
from router.scheduling.scheduler import SchedulerConfig
from tests.support.scheduling import _seq, _step


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _sched(clock: Clock, max_batch_size: int = 3, timeout: float = 0.1, num_blocks: int = 64):
    config = SchedulerConfig(64, 8, 128, (2,), 0)
    allocator = BlockAllocator(num_blocks, 4, True)
    return DynamicBatchScheduler(config, allocator, max_batch_size, timeout, clock=clock)


def _ids(plan) -> set[int]:
    return {s.seq_id for s in plan.seqs}


def test_a_partial_batch_waits_for_the_timeout_then_runs():
    clock = Clock()
    sched = _sched(clock)
    sched.add(_seq(1, 5))
    clock.now += 0.04
    sched.add(_seq(2, 5))
    assert sched.schedule() is None  # gathering
    assert abs(sched.wait_seconds() - 0.06) < 1e-9  # counted from the first arrival
    clock.now += 0.06
    assert sched.wait_seconds() == 0.0
    assert _ids(_step(sched)) == {1, 2}
    assert sched.num_batches == 1


def test_a_full_batch_runs_at_once_and_later_arrivals_wait_for_all_of_it():
    clock = Clock()
    sched = _sched(clock, max_batch_size=2)
    for i in (1, 2, 3):
        sched.add(_seq(i, 5, max_tokens=4 if i == 1 else 2))
    assert _ids(_step(sched)) == {1, 2}  # full: no waiting; 3 is not in it
    clock.now += 10  # 3 has waited far past the timeout: it still waits for the batch
    while sched.batch:
        plan = _step(sched)
        assert 3 not in _ids(plan)
    assert sched.wait_seconds() is not None  # 3 now waits for its own batch
    assert _ids(_step(sched)) == {3}
    assert sched.num_batches == 2


def test_an_aborted_member_leaves_its_batch():
    clock = Clock()
    sched = _sched(clock, max_batch_size=2)
    for i in (1, 2, 3):
        sched.add(_seq(i, 5, max_tokens=50))
    _step(sched)
    assert sched.batch == {1, 2}
    sched.abort(1)
    sched.abort(2)
    assert not sched.batch
    assert sched.wait_seconds() is not None  # 3 now gathers a batch of its own


def test_a_preempted_member_stays_in_its_batch_and_finishes_it():
    clock = Clock()
    # 6 blocks of 4: two members of 8-token prompts and long outputs run out of blocks
    sched = _sched(clock, max_batch_size=2, num_blocks=6)
    for i in (1, 2):
        sched.add(_seq(i, 8, max_tokens=12))
    sched.add(_seq(3, 4, max_tokens=1))
    for _ in range(200):
        plan = _step(sched)
        assert plan is None or 3 not in _ids(plan)
        if not sched.batch:
            break
    assert 1 not in sched.seqs and 2 not in sched.seqs  # both finished, 3 never joined them
    assert sched.num_preemptions > 0
    plan = _step(sched)
    assert (plan is None or 3 not in _ids(plan)) and sched.wait_seconds() > 0  # 3 gathers anew
