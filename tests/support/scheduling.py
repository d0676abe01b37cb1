"""Shared helpers for the scheduler tests: fabricated sequences, steps and results."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from router.params import GenerationParams
from router.scheduling.block_allocator import BlockAllocator
from router.scheduling.scheduler import Scheduler, SchedulerConfig
from router.scheduling.sequence import Sequence
from shards.wire import SeqOutput, StepPlan, StepResult

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
