"""What the async engine hands each request's consumer (`RequestOutput`, assembled from a step's
update: detokenized text cut at stop strings, tokens, logprobs), and what it keeps per request
(`Stream`)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from router.http.detokenize import IncrementalDetokenizer
from router.scheduling.sequence import Sequence, SeqUpdate


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
        its metrics observe (router/http/metrics.py). Times in seconds from arrival."""
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


def assemble(stream: Stream, u: SeqUpdate, scheduler, first: bool) -> RequestOutput:
    """What the request's consumer gets for a step's update: its new text (the stop token is
    not part of it; a stop string found in it ends the sequence there, through the
    scheduler), its tokens and logprobs, and the prompt's logprobs with the first output."""
    seq = stream.seq
    text = ""
    if stream.detok is not None:
        shown = u.new_token_ids
        if seq.stopped_on_token:
            shown = shown[:-1]
        text = stream.detok.add_tokens(shown)
        if stream.detok.stopped_on is not None and not seq.is_finished:
            scheduler.stop_after(u, stream.detok.num_taken)
        if seq.is_finished:
            text += stream.detok.flush()
    prompt = first and seq.params.sampling.prompt_logprobs is not None
    return request_output(
        seq,
        text,
        u.new_token_ids,
        logprobs=u.logprobs,
        top_logprobs=u.top_logprobs,
        prompt_logprobs=seq.prompt_logprobs if prompt else None,
        prompt_top_logprobs=seq.prompt_top_logprobs if prompt else None,
    )


def request_output(seq: Sequence, text: str, token_ids: list[int], **extra) -> RequestOutput:
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
