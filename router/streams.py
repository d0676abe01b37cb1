"""What the async engine hands each request's consumer, and what it keeps per request."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from router.detokenize import IncrementalDetokenizer
from router.scheduler import SeqUpdate
from router.sequence import Sequence


class EngineDeadError(RuntimeError):
    pass


class Overloaded(RuntimeError):
    """Too much is waiting already: the request is refused before it is queued."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class RequestOutput:
    text: str  # newly final text
    token_ids: list[int]  # newly generated tokens
    logprobs: list[float] | None = None
    top_logprobs: list | None = None
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    num_draft_proposed: int = 0  # lookahead draft tokens verified for this request so far
    num_draft_accepted: int = 0
    prompt_logprobs: list[float] | None = None  # first output only, when the prompt is scored
    prompt_top_logprobs: list | None = None


@dataclass
class Stream:
    seq: Sequence
    detok: IncrementalDetokenizer | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: float = field(default_factory=time.monotonic)  # arrival
    scheduled_at: float | None = None  # its first step; until then it is waiting
    first_token_at: float | None = None
    last_token_at: float | None = None

    def account(self, now: float) -> dict:
        """A finished request's account: the fields of its log line (structured logs) and what
        its metrics observe (router/metrics.py). Times in seconds from arrival."""
        seq, first = self.seq, self.first_token_at
        return {
            "request_id": seq.request_id,
            "event": "finished",
            "finish_reason": seq.finish_reason,
            "prompt_tokens": seq.num_prompt_tokens,
            "cached_tokens": seq.num_cached_prompt_tokens,
            "output_tokens": seq.num_output_tokens,
            "queue_s": round((self.scheduled_at or now) - self.started, 4),
            "ttft_s": None if first is None else round(first - self.started, 4),
            "total_s": round(now - self.started, 4),
        }


def drop_after_stop(u: SeqUpdate, seq: Sequence, taken: int) -> None:
    extra = len(u.new_token_ids) - taken
    if extra <= 0:
        return
    del seq.token_ids[-extra:]
    u.new_token_ids = u.new_token_ids[:taken]
    if u.logprobs is not None:
        u.logprobs = u.logprobs[:taken]
    if u.top_logprobs is not None:
        u.top_logprobs = u.top_logprobs[:taken]
