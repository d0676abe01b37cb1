"""The async engine: owns request streams and the step loop on the event loop; makes no
scheduling choice (the scheduler does).

Each request holds a concurrency slot (MAX_CONCURRENCY per worker; the rest wait for one), is
added to the scheduler, and receives `RequestOutput`s as steps finish. A request whose consumer
goes away (client disconnect) is aborted and its KV blocks freed at once. A request is waiting
from its arrival until its first step; `admit` refuses new ones past the waiting bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator

from router.detokenize import IncrementalDetokenizer
from router.engine_core import EngineCore, StepTimes
from router.metrics import GroupMetrics
from router.params import GenerationParams
from router.scheduler import Scheduler, SeqUpdate
from router.sequence import Sequence
from router.streams import EngineDeadError, Overloaded, RequestOutput, Stream, drop_after_stop

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
        """request_timeout: seconds from arrival after which a request ends (finish reason
        `timeout`, with what it has so far); queue_timeout: seconds it may wait before its
        first step (then refused as Overloaded `queue_timeout`). None: no deadline."""
        self.tokenizer = tokenizer
        self.max_concurrency = max_concurrency
        self._slots = asyncio.Semaphore(max_concurrency)
        self._streams: dict[int, Stream] = {}
        self._wake = asyncio.Event()
        self._ids = itertools.count(1)
        self._task: asyncio.Task | None = None
        self.dead: str | None = None
        self.core = EngineCore(scheduler, shard)  # holds both; the step's update and accounting
        self.num_queued = 0
        self.finished_by_reason: dict[str, int] = {}
        self.metrics = metrics
        self.max_waiting_requests = max_waiting_requests
        self.max_waiting_tokens = max_waiting_tokens
        self.num_waiting = 0  # arrived, not yet in a step (waiting for a slot or the scheduler)
        self.num_waiting_tokens = 0  # their prompt tokens
        self.step_started: float | None = None  # monotonic start of the step in flight
        self.request_timeout = request_timeout
        self.queue_timeout = queue_timeout

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
        return len(self._streams) + self.num_queued

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    def admit(self, num_prompt_tokens: int) -> None:
        """Raise Overloaded when one more request would wait past the bounds."""
        if self.max_waiting_requests is not None and self.num_waiting >= self.max_waiting_requests:
            raise Overloaded(
                "waiting_requests",
                f"{self.num_waiting} requests are already waiting (--max-waiting-requests "
                f"{self.max_waiting_requests}); retry later",
            )
        tokens = self.num_waiting_tokens + num_prompt_tokens
        limit = self.max_waiting_tokens
        # One prompt alone is always let in, however long: it only waits for its turn.
        if limit is not None and self.num_waiting and tokens > limit:
            raise Overloaded(
                "waiting_tokens",
                f"{self.num_waiting_tokens} prompt tokens are already waiting "
                f"(--max-waiting-tokens {self.max_waiting_tokens}); retry later",
            )

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
        self.num_waiting += 1
        self.num_waiting_tokens += seq.num_prompt_tokens
        try:
            self.num_queued += 1
            try:
                await asyncio.wait_for(self._slots.acquire(), self._slot_wait(stream))
            except asyncio.TimeoutError:
                raise self._timed_out_waiting(stream) from None
            finally:
                self.num_queued -= 1
            try:
                async for out in self._run(stream, detokenize):
                    yield out
            finally:
                self._slots.release()
        finally:
            if stream.scheduled_at is None:
                self._left_waiting(stream)

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
                self._count_finish("abort")
                log.info(
                    "%s aborted: client went away, KV blocks freed",
                    seq.request_id,
                    extra={"request_id": seq.request_id, "event": "aborted"},
                )
                self._wake.set()

    def _slot_wait(self, stream: Stream) -> float | None:
        limits = [t for t in (self.queue_timeout, self.request_timeout) if t is not None]
        return min(limits) if limits else None

    def _timed_out_waiting(self, stream: Stream) -> Overloaded:
        waited = time.monotonic() - stream.started
        self._count_finish("queue_timeout")
        rid = stream.seq.request_id
        log.info(
            "%s refused: waited %.1fs without a step",
            rid,
            waited,
            extra={"request_id": rid, "event": "queue_timeout", "queue_s": round(waited, 3)},
        )
        return Overloaded(
            "queue_timeout",
            f"the request waited {waited:.1f}s without starting (--queue-timeout / "
            f"--request-timeout); retry later",
        )

    def _expire(self, now: float) -> None:
        """End the requests whose deadline has passed; their blocks are freed at once."""
        for stream in list(self._streams.values()):
            waited = now - stream.started
            queue_over = self.queue_timeout is not None and waited > self.queue_timeout
            if stream.scheduled_at is None and queue_over:
                reason = "queue_timeout"
            elif self.request_timeout is not None and waited > self.request_timeout:
                reason = "timeout"
            else:
                continue
            if not self.scheduler.abort(stream.seq.seq_id, reason=reason):
                continue  # finished in this very step
            if reason == "timeout":
                self._end(stream, now)
            else:
                stream.queue.put_nowait(self._timed_out_waiting(stream))

    def _end(self, stream: Stream, now: float) -> None:
        """The final output of a request the engine itself ended (its deadline)."""
        seq = stream.seq
        self._count_finish(seq.finish_reason)
        account = stream.account(now)
        log.info(
            "%s finished: %s after %.1fs, output %d tokens, KV blocks freed",
            seq.request_id,
            seq.finish_reason,
            account["total_s"],
            seq.num_output_tokens,
            extra=account,
        )
        if self.metrics is not None:
            self.metrics.finished(account)
        text = stream.detok.flush() if stream.detok is not None else ""
        stream.queue.put_nowait(_output(seq, text, []))

    def _left_waiting(self, stream: Stream) -> None:
        self.num_waiting -= 1
        self.num_waiting_tokens -= stream.seq.num_prompt_tokens

    def _scheduled(self, plan, now: float) -> None:
        for s in plan.seqs:
            stream = self._streams.get(s.seq_id)
            if stream is not None and stream.scheduled_at is None:
                stream.scheduled_at = now
                self._left_waiting(stream)
                if self.metrics is not None:
                    self.metrics.queue_time.observe(now - stream.started)

    async def _loop(self) -> None:
        try:
            while True:
                started = time.perf_counter()
                plan = self.scheduler.schedule()
                if plan is None:
                    self._wake.clear()
                    await self._idle()
                    continue
                self._scheduled(plan, time.monotonic())
                sent = time.perf_counter()
                self.step_started = time.monotonic()
                result = await self.shard.execute(plan)
                self.step_started = None
                self.core.finish(plan, result, started, sent, self._after_step)
                if plan.seqs and self.metrics is not None:
                    took = time.perf_counter() - started
                    self.metrics.step(took, len(plan.seqs), plan.num_tokens)
                await asyncio.sleep(0)  # let request handlers run between steps
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the shard died or broke its protocol: fail every request
            self.dead = f"engine stopped: {type(e).__name__}: {e}"
            log.error("%s", self.dead)
            for stream in list(self._streams.values()):
                stream.queue.put_nowait(EngineDeadError(self.dead))

    def _after_step(self, updates: list[SeqUpdate]) -> None:
        self._publish(updates)
        if self.request_timeout is not None or self.queue_timeout is not None:
            self._expire(time.monotonic())

    async def _idle(self) -> None:
        """Until a request arrives or leaves, or (dynamic batching) a gathering batch is due."""
        wait_seconds = getattr(self.scheduler, "wait_seconds", None)
        timeout = wait_seconds() if wait_seconds else None
        if timeout is None:
            await self._wake.wait()
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _publish(self, updates: list[SeqUpdate]) -> None:
        now = time.monotonic()
        for u in updates:
            stream = self._streams.get(u.seq.seq_id)
            if stream is None:
                continue
            seq = stream.seq
            prompt_lp = prompt_top = None
            since_last = None if stream.last_token_at is None else now - stream.last_token_at
            if stream.first_token_at is None:
                stream.first_token_at = now
                if self.metrics is not None:
                    self.metrics.ttft.observe(now - stream.started)
                if seq.params.sampling.prompt_logprobs is not None:
                    prompt_lp, prompt_top = seq.prompt_logprobs, seq.prompt_top_logprobs
            stream.last_token_at = now
            if self.metrics is not None and u.new_token_ids:
                self.metrics.tokens(len(u.new_token_ids), since_last)
            text = ""
            if stream.detok is not None:
                shown = u.new_token_ids
                if seq.stopped_on_token:  # the stop token ends the text, it is not part of it
                    shown = shown[:-1]
                text = stream.detok.add_tokens(shown)
                if stream.detok.stopped_on is not None and not seq.is_finished:
                    # Several tokens can arrive at once (lookahead): those after the stop
                    # string never happened, as in plain decoding.
                    drop_after_stop(u, seq, stream.detok.num_taken)
                    self.scheduler.abort(seq.seq_id, reason="stop")
                if seq.is_finished:
                    text += stream.detok.flush()
            if seq.is_finished:
                reason = seq.finish_reason
                self._count_finish(reason)
                account = stream.account(now)
                log.info(
                    "%s finished: %s, prompt %d tokens (%d cached), output %d tokens, "
                    "queue %.3fs, ttft %.3fs, total %.3fs",
                    seq.request_id,
                    reason,
                    seq.num_prompt_tokens,
                    seq.num_cached_prompt_tokens,
                    seq.num_output_tokens,
                    account["queue_s"],
                    account["ttft_s"],
                    account["total_s"],
                    extra=account,
                )
                if self.metrics is not None:
                    self.metrics.finished(account)
            stream.queue.put_nowait(
                _output(
                    seq,
                    text,
                    u.new_token_ids,
                    logprobs=u.logprobs,
                    top_logprobs=u.top_logprobs,
                    prompt_logprobs=prompt_lp,
                    prompt_top_logprobs=prompt_top,
                )
            )

    def _count_finish(self, reason: str) -> None:
        self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1

    def live_state(self) -> dict:
        """What /metrics reads at each scrape."""
        alloc = self.scheduler.allocator
        return {
            "running": self.scheduler.num_running,
            "waiting": self.num_queued + self.scheduler.num_waiting,  # incl. pre-empted ones
            "waiting_tokens": self.num_waiting_tokens,
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
            "queued": self.num_queued,
            "active_requests": len(self._streams),
            "max_concurrency": self.max_concurrency,
            "kv_blocks_total": alloc.num_blocks,
            "kv_blocks_used": alloc.num_used,
            "kv_blocks_free": alloc.num_free,
            "prefix_cache_blocks": alloc.num_cached,
            "prefix_cache_hit_rate": alloc.num_hit_blocks / queried,
            "preemptions": self.scheduler.num_preemptions,
            "draft_tokens_proposed": self.scheduler.num_draft_proposed,
            "draft_tokens_accepted": self.scheduler.num_draft_accepted,
            "finished": dict(self.finished_by_reason),
            "steps": self.times.summary(),
            "dead": self.dead,
        }


def _output(seq: Sequence, text: str, token_ids: list[int], **extra) -> RequestOutput:
    """A request's output now: its new text and tokens, with the sequence's running counts."""
    return RequestOutput(
        text=text,
        token_ids=token_ids,
        finished=seq.is_finished,
        finish_reason=seq.finish_reason,
        num_prompt_tokens=seq.num_prompt_tokens,
        num_output_tokens=seq.num_output_tokens,
        num_cached_tokens=seq.num_cached_prompt_tokens,
        num_draft_proposed=seq.num_draft_proposed,
        num_draft_accepted=seq.num_draft_accepted,
        **extra,
    )
