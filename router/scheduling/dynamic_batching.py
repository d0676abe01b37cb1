"""The DeepSpeed image's batching (`--scheduler dynamic-batching`): requests are gathered into a
batch of up to MAX_BATCH_SIZE, waiting at most BATCH_WAIT_TIMEOUT seconds after the first of
them arrived, and the batch runs to completion before the next one forms: a request that
arrives meanwhile waits for the whole batch, as in that image.

Everything else is the continuous scheduler's: token budgets (a batch's prompts may take
several chunked steps), paged KV blocks, the prefix cache, pre-emption (a pre-empted member
stays in its batch). It exists for compatibility and comparison; continuous batching is faster
under load (BENCHMARKS.md).
"""

from __future__ import annotations

import time
from collections import deque

from router.scheduling.block_allocator import BlockAllocator
from router.scheduling.scheduler import Scheduler, SchedulerConfig
from router.scheduling.sequence import Sequence


class DynamicBatchScheduler(Scheduler):
    def __init__(
        self,
        config: SchedulerConfig,
        allocator: BlockAllocator,
        max_batch_size: int,
        batch_wait_timeout: float,
        clock=time.monotonic,
    ) -> None:
        super().__init__(config, allocator, None)
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout = batch_wait_timeout
        self.clock = clock
        self._arrived: dict[int, float] = {}
        self.batch: set[int] = set()  # the running batch's unfinished members
        self.num_batches = 0

    def add(self, seq: Sequence) -> None:
        super().add(seq)
        self._arrived[seq.seq_id] = self.clock()

    def wait_seconds(self) -> float | None:
        """Seconds until the next batch forms by itself; None while a batch runs or nothing
        waits (then only an arrival or a finish changes anything)."""
        if self.batch or not self.waiting:
            return None
        if len(self.waiting) >= self.max_batch_size:
            return 0.0
        first = self._arrived[self.waiting[0].seq_id]
        return max(0.0, first + self.batch_wait_timeout - self.clock())

    def _admit(self, chosen, budget: int) -> int:
        if not self.batch:
            if self.wait_seconds() != 0.0:
                return budget  # still gathering
            self.batch = {s.seq_id for s in list(self.waiting)[: self.max_batch_size]}
            self.num_batches += 1
        # The batch's members lead the queue (arrival order; a pre-empted one goes back to the
        # front): admit from them only.
        members = 0
        for seq in self.waiting:
            if seq.seq_id not in self.batch:
                break
            members += 1
        later: deque[Sequence] = deque()
        while len(self.waiting) > members:
            later.appendleft(self.waiting.pop())
        try:
            return super()._admit(chosen, budget)
        finally:
            self.waiting.extend(later)

    def _finish(self, seq: Sequence, reason: str) -> None:
        super()._finish(seq, reason)
        self.batch.discard(seq.seq_id)
        self._arrived.pop(seq.seq_id, None)
