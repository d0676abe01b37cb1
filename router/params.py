"""What a caller asks of one generation: sampling (sent to the shard) and stopping (router-only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from shards.wire import SamplingParams


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 16
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, matched on the detokenized text
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # max_tokens=0 only makes sense for scoring the prompt (echo + logprobs).
        assert self.max_tokens >= 1 or (
            self.max_tokens == 0 and self.sampling.prompt_logprobs is not None
        ), "max_tokens must be positive"
