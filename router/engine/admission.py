"""Who may wait, and for how long: the concurrency slots, the waiting bounds
(`--max-waiting-requests`, `--max-waiting-tokens`) and the deadlines (`--queue-timeout`,
`--request-timeout`).

A request is waiting from its arrival until its first step: for a slot (MAX_CONCURRENCY per
worker), then for the scheduler. `admit` refuses a new one past the bounds before its stream
starts, so the refusal is still a plain 429.
"""

from __future__ import annotations

import asyncio
import time

from router.engine.outputs import Overloaded, Stream


class Admission:
    def __init__(
        self,
        max_concurrency: int,
        max_waiting_requests: int | None = None,
        max_waiting_tokens: int | None = None,
        request_timeout: float | None = None,
        queue_timeout: float | None = None,
    ) -> None:
        """request_timeout: seconds from arrival after which a request ends (finish reason
        `timeout`, with what it has so far); queue_timeout: seconds it may wait before its
        first step (then refused as Overloaded `queue_timeout`). None: no deadline."""
        self.max_concurrency = max_concurrency
        self._slots = asyncio.Semaphore(max_concurrency)
        self.max_waiting_requests = max_waiting_requests
        self.max_waiting_tokens = max_waiting_tokens
        self.request_timeout = request_timeout
        self.queue_timeout = queue_timeout
        self.num_queued = 0  # waiting for a slot
        self.num_waiting = 0  # arrived, not yet in a step (waiting for a slot or the scheduler)
        self.num_waiting_tokens = 0  # their prompt tokens

    @property
    def has_deadlines(self) -> bool:
        return self.request_timeout is not None or self.queue_timeout is not None

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

    def arrived(self, stream: Stream) -> None:
        self.num_waiting += 1
        self.num_waiting_tokens += stream.seq.num_prompt_tokens

    def left_waiting(self, stream: Stream) -> None:
        """Its first step, or it left before one."""
        self.num_waiting -= 1
        self.num_waiting_tokens -= stream.seq.num_prompt_tokens

    async def take_slot(self) -> bool:
        """Wait for a concurrency slot within the deadlines; False if they passed first (the
        caller refuses the request: `refusal`)."""
        limits = [t for t in (self.queue_timeout, self.request_timeout) if t is not None]
        self.num_queued += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), min(limits) if limits else None)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self.num_queued -= 1

    def release_slot(self) -> None:
        self._slots.release()

    def deadline_passed(self, stream: Stream, now: float) -> str | None:
        """ "queue_timeout" (it has waited too long for its first step), "timeout" (it has run
        too long), or None."""
        waited = now - stream.started
        if (
            stream.scheduled_at is None
            and self.queue_timeout is not None
            and waited > self.queue_timeout
        ):
            return "queue_timeout"
        if self.request_timeout is not None and waited > self.request_timeout:
            return "timeout"
        return None

    @staticmethod
    def refusal(stream: Stream) -> Overloaded:
        waited = time.monotonic() - stream.started
        return Overloaded(
            "queue_timeout",
            f"the request waited {waited:.1f}s without starting (--queue-timeout / "
            f"--request-timeout); retry later",
        )
