"""The synchronous step loop: schedule → shard executes → update. Used by the offline API and
wrapped by the async engine; it makes no scheduling choice of its own."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Protocol

from router.params import GenerationParams
from router.scheduling.scheduler import Scheduler
from router.scheduling.sequence import Sequence, SeqUpdate
from shards.wire import StepPlan, StepResult


class Shard(Protocol):
    def execute(self, plan: StepPlan) -> StepResult: ...


@dataclass
class StepTimes:
    """Cumulative seconds per phase, for the step-time breakdown."""

    steps: int = 0
    schedule: float = 0.0
    shard: float = 0.0  # round trip, including transport
    forward: float = 0.0  # as measured inside the shard (forward + sampling)
    update: float = 0.0
    tokens: int = 0

    def summary(self) -> dict:
        n = max(self.steps, 1)
        return {
            "steps": self.steps,
            "tokens_per_step": self.tokens / n,
            "schedule_ms": 1e3 * self.schedule / n,
            "shard_ms": 1e3 * self.shard / n,
            "forward_ms": 1e3 * self.forward / n,
            "transport_ms": 1e3 * (self.shard - self.forward) / n,
            "update_ms": 1e3 * self.update / n,
            # Router work (planning, bookkeeping, detokenizing) per step, as a share of the step.
            "router_share": (self.schedule + self.update)
            / max(self.schedule + self.shard + self.update, 1e-9),
        }


class EngineCore:
    def __init__(self, scheduler: Scheduler, shard: Shard) -> None:
        self.scheduler = scheduler
        self.shard = shard
        self.times = StepTimes()
        self._ids = itertools.count(1)

    def add(
        self, request_id: str, prompt_token_ids: list[int], params: GenerationParams
    ) -> Sequence:
        seq = Sequence(next(self._ids), request_id, list(prompt_token_ids), params)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq_id: int) -> Sequence | None:
        return self.scheduler.abort(seq_id)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[SeqUpdate]:
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan is None:
            return []
        sent = time.perf_counter()
        return self.finish(plan, self.shard.execute(plan), started, sent)

    def finish(
        self, plan: StepPlan, result: StepResult, started: float, sent: float
    ) -> list[SeqUpdate]:
        """A step's second half, for this loop and the async engine's alike: the scheduler's
        update for `result` and the step's times (`started` before scheduling, `sent` when the
        plan left). The async engine publishes the updates while its next step runs."""
        back = time.perf_counter()
        updates = self.scheduler.update(plan, result, back - started)
        if plan.seqs:
            tm = self.times
            tm.steps += 1
            tm.tokens += plan.num_tokens
            tm.schedule += sent - started
            tm.shard += back - sent
            tm.forward += result.forward_seconds
            tm.update += time.perf_counter() - back
        return updates
