"""The async engine: owns request streams and the step loop on the event loop; makes no
scheduling choice (the scheduler does) and changes sequences only through the scheduler.

Each request waits for a concurrency slot (`Admission`: slots, waiting bounds, deadlines), is
added to the scheduler, and receives `RequestOutput`s as steps finish (`assemble`: text, stops,
logprobs); `Accounting` counts, logs and observes what happens to it. A request whose consumer
goes away (client disconnect) is aborted and its KV blocks freed at once. Each step is
`EngineCore`'s, as in the offline engine: plan, execute on the shard, finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator

from router.engine.accounting import Accounting
from router.engine.admission import Admission
from router.engine.core import EngineCore, StepTimes
from router.engine.outputs import (
    EngineDeadError,
    RequestOutput,
    Stream,
    assemble,
    request_output,
)
from router.http.detokenize import IncrementalDetokenizer
from router.http.metrics import GroupMetrics
from router.params import GenerationParams
from router.scheduling.scheduler import Scheduler
from router.scheduling.sequence import Sequence, SeqUpdate

log = logging.getLogger("shardserve.engine")


class AsyncEngine:
    def __init__(
        self,
        scheduler: Scheduler,
        shard,
        tokenizer,
        max_concurrency: int,
        metrics: GroupMetrics | None = None,
        max_waiting_requests: int | None = None,
        max_waiting_tokens: int | None = None,
        request_timeout: float | None = None,
        queue_timeout: float | None = None,
    ) -> None:
        """The bounds and deadlines are `Admission`'s."""
        self.tokenizer = tokenizer
        self.core = EngineCore(scheduler, shard)  # holds both; the step's update and timing
        self.admission = Admission(
            max_concurrency,
            max_waiting_requests,
            max_waiting_tokens,
            request_timeout,
            queue_timeout,
        )
        self.accounting = Accounting(metrics)
        self._streams: dict[int, Stream] = {}
        self._wake = asyncio.Event()
        self._ids = itertools.count(1)
        self._task: asyncio.Task | None = None
        self.dead: str | None = None
        self.step_started: float | None = None  # monotonic start of the step in flight

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def shard(self):
        return self.core.shard

    @property
    def times(self) -> StepTimes:
        return self.core.times

    @property
    def outstanding(self) -> int:
        """Requests holding or waiting for a concurrency slot."""
        return len(self._streams) + self.admission.num_queued

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    def admit(self, num_prompt_tokens: int) -> None:
        """Raise Overloaded when one more request would wait past the bounds."""
        self.admission.admit(num_prompt_tokens)

    def stuck_for(self) -> float:
        """Seconds the step in flight has taken so far (0 when none is)."""
        return 0.0 if self.step_started is None else time.monotonic() - self.step_started

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: GenerationParams,
        detokenize: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        if self.dead:
            raise EngineDeadError(self.dead)
        seq = Sequence(next(self._ids), request_id, list(prompt_token_ids), params)
        stream = Stream(seq, None)
        admission = self.admission
        admission.arrived(stream)
        try:
            if not await admission.take_slot():
                self.accounting.refused(stream)
                raise admission.refusal(stream)
            try:
                async for out in self._run(stream, detokenize):
                    yield out
            finally:
                admission.release_slot()
        finally:
            if stream.scheduled_at is None:
                admission.left_waiting(stream)

    async def _run(self, stream: Stream, detokenize: bool) -> AsyncIterator[RequestOutput]:
        seq = stream.seq
        try:
            self.scheduler.add(seq)
            if detokenize:
                stream.detok = IncrementalDetokenizer(
                    self.tokenizer, seq.prompt_token_ids, seq.params.stop
                )
            self._streams[seq.seq_id] = stream
            self._wake.set()
            while True:
                out = await stream.queue.get()
                if isinstance(out, Exception):
                    raise out
                yield out
                if out.finished:
                    return
        finally:
            self._streams.pop(seq.seq_id, None)
            if not seq.is_finished and self.scheduler.abort(seq.seq_id):
                self.accounting.aborted(seq)
                self._wake.set()

    async def _loop(self) -> None:
        # A step's updates reach their streams while the next step runs: the plan leaves as soon
        # as the scheduler has the results, and detokenizing, stop strings and the HTTP writes
        # overlap the shard's forward instead of delaying it. (A stop string found then ends its
        # sequence one step late on the shard; the scheduler drops that step's token for it, as
        # for any sequence aborted while a step runs.)
        pending: list[SeqUpdate] = []
        try:
            while True:
                started = time.perf_counter()
                plan = self.scheduler.schedule()
                if plan is None:
                    if pending:  # publishing may end sequences or free slots: plan again
                        self._publish(pending)
                        pending = []
                        continue
                    self._wake.clear()
                    await self._idle()
                    continue
                self._scheduled(plan, time.monotonic())
                sent = time.perf_counter()
                self.step_started = time.monotonic()
                step = asyncio.ensure_future(self.shard.execute(plan))
                if pending:
                    await asyncio.sleep(0)  # the step's task runs until it waits: the plan is out
                    self._publish(pending)
                result = await step
                self.step_started = None
                pending = self.core.finish(plan, result, started, sent)
                took = time.perf_counter() - started
                self.accounting.step(took, len(plan.seqs), plan.num_tokens)
                await asyncio.sleep(0)  # let request handlers run between steps
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the shard died or broke its protocol: fail every request
            self.dead = f"engine stopped: {type(e).__name__}: {e}"
            log.error("%s", self.dead)
            for stream in list(self._streams.values()):
                stream.queue.put_nowait(EngineDeadError(self.dead))

    async def _idle(self) -> None:
        """Until a request arrives or leaves, or the scheduler wants a step by itself."""
        timeout = self.scheduler.wait_seconds()
        if timeout is None:
            await self._wake.wait()
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _scheduled(self, plan, now: float) -> None:
        for s in plan.seqs:
            stream = self._streams.get(s.seq_id)
            if stream is not None and stream.scheduled_at is None:
                self.accounting.scheduled(stream, now)
                self.admission.left_waiting(stream)

    def _publish(self, updates: list[SeqUpdate]) -> None:
        now = time.monotonic()
        for u in updates:
            stream = self._streams.get(u.seq.seq_id)
            if stream is None:
                continue
            first = self.accounting.tokens(stream, len(u.new_token_ids), now)
            out = assemble(stream, u, self.scheduler, first)
            if out.finished:
                self.accounting.finished(stream, now)
            stream.queue.put_nowait(out)
        if self.admission.has_deadlines:
            self._expire(now)

    def _expire(self, now: float) -> None:
        """End the requests whose deadline has passed; their blocks are freed at once."""
        for stream in list(self._streams.values()):
            reason = self.admission.deadline_passed(stream, now)
            if reason is None or not self.scheduler.abort(stream.seq.seq_id, reason=reason):
                continue  # in time, or finished in this very step
            if reason == "timeout":  # the final output, with what it has so far
                self.accounting.finished(stream, now)
                text = stream.detok.flush() if stream.detok is not None else ""
                stream.queue.put_nowait(request_output(stream.seq, text, []))
            else:
                self.accounting.refused(stream)
                stream.queue.put_nowait(self.admission.refusal(stream))

    def live_state(self) -> dict:
        """What /metrics reads at each scrape."""
        alloc = self.scheduler.allocator
        return {
            "running": self.scheduler.num_running,
            # incl. pre-empted ones
            "waiting": self.admission.num_queued + self.scheduler.num_waiting,
            "waiting_tokens": self.admission.num_waiting_tokens,
            "usage": alloc.num_used / max(alloc.num_blocks, 1),
            "used": alloc.num_used,
            "free": alloc.num_free,
            "queries": alloc.num_queried_blocks,
            "hits": alloc.num_hit_blocks,
            "preempted": self.scheduler.num_preemptions,
            "drafts": self.scheduler.num_draft_proposed,
            "accepted": self.scheduler.num_draft_accepted,
            "dead": 1 if self.dead else 0,
        }

    def stats(self) -> dict:
        alloc = self.scheduler.allocator
        queried = max(alloc.num_queried_blocks, 1)
        return {
            "running": self.scheduler.num_running,
            "waiting": self.scheduler.num_waiting,
            "queued": self.admission.num_queued,
            "active_requests": len(self._streams),
            "max_concurrency": self.admission.max_concurrency,
            "kv_blocks_total": alloc.num_blocks,
            "kv_blocks_used": alloc.num_used,
            "kv_blocks_free": alloc.num_free,
            "prefix_cache_blocks": alloc.num_cached,
            "prefix_cache_hit_rate": alloc.num_hit_blocks / queried,
            "preemptions": self.scheduler.num_preemptions,
            "draft_tokens_proposed": self.scheduler.num_draft_proposed,
            "draft_tokens_accepted": self.scheduler.num_draft_accepted,
            "finished": dict(self.accounting.finished_by_reason),
            "steps": self.times.summary(),
            "dead": self.dead,
        }
