"""What the engine counts and says about requests: finish reasons (`/stats`), one log line per
event with the request id, and the Prometheus events of its worker group (router/http/metrics.py).
"""

from __future__ import annotations

import logging
import time

from router.engine.outputs import Stream
from router.http.metrics import GroupMetrics
from router.scheduling.sequence import Sequence

log = logging.getLogger("shardserve.engine")


class Accounting:
    def __init__(self, metrics: GroupMetrics | None = None) -> None:
        self.metrics = metrics
        self.finished_by_reason: dict[str, int] = {}

    def count(self, reason: str) -> None:
        self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1

    def scheduled(self, stream: Stream, now: float) -> None:
        stream.scheduled_at = now
        if self.metrics is not None:
            self.metrics.queue_time.observe(now - stream.started)

    def tokens(self, stream: Stream, num_tokens: int, now: float) -> bool:
        """Tokens arrived for the request now; True for its first."""
        first = stream.first_token_at is None
        since_last = None if first else now - stream.last_token_at
        if first:
            stream.first_token_at = now
            if self.metrics is not None:
                self.metrics.ttft.observe(now - stream.started)
        stream.last_token_at = now
        if self.metrics is not None and num_tokens:
            self.metrics.tokens(num_tokens, since_last)
        return first

    def finished(self, stream: Stream, now: float) -> None:
        seq = stream.seq
        self.count(seq.finish_reason)
        account = stream.account(now)
        if seq.finish_reason == "timeout":  # ended by the engine, not by the step
            log.info(
                "%s finished: %s after %.1fs, output %d tokens, KV blocks freed",
                seq.request_id,
                seq.finish_reason,
                account["total_s"],
                seq.num_output_tokens,
                extra=account,
            )
        else:
            log.info(
                "%s finished: %s, prompt %d tokens (%d cached), output %d tokens, "
                "queue %.3fs, ttft %.3fs, total %.3fs",
                seq.request_id,
                seq.finish_reason,
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

    def refused(self, stream: Stream) -> None:
        """It waited past its deadline for its first step."""
        waited = time.monotonic() - stream.started
        self.count("queue_timeout")
        rid = stream.seq.request_id
        log.info(
            "%s refused: waited %.1fs without a step",
            rid,
            waited,
            extra={"request_id": rid, "event": "queue_timeout", "queue_s": round(waited, 3)},
        )

    def aborted(self, seq: Sequence) -> None:
        self.count("abort")
        log.info(
            "%s aborted: client went away, KV blocks freed",
            seq.request_id,
            extra={"request_id": seq.request_id, "event": "aborted"},
        )

    def step(self, seconds: float, num_seqs: int, num_tokens: int) -> None:
        if num_seqs and self.metrics is not None:
            self.metrics.step(seconds, num_seqs, num_tokens)
