"""One sequence's state as the scheduler sees it: tokens, progress through the KV cache, blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from router.params import GenerationParams


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: GenerationParams
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # one per full block of token_ids
    num_committed_blocks: int = 0  # leading blocks registered in the prefix cache
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stopped_on_token: bool = False  # finished by an EOS or stop token id (kept out of the text)
    announced: bool = False  # the shard has its sampling state
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    num_draft_proposed: int = 0  # lookahead draft tokens verified for this sequence
    num_draft_accepted: int = 0
    # Logprob of prompt token i given tokens < i, for i >= 1, when the caller scores the prompt.
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def full_block_hashes(self, block_size: int) -> list[int]:
        """Chained hashes of every full block of tokens: a block's hash covers its whole prefix,
        so equal hashes mean equal K/V."""
        hashes = self.block_hashes
        tokens = self.token_ids
        while (len(hashes) + 1) * block_size <= len(tokens):
            i = len(hashes)
            parent = hashes[-1] if hashes else 0
            hashes.append(hash((parent, tuple(tokens[i * block_size : (i + 1) * block_size]))))
        return hashes


@dataclass
class SeqUpdate:
    """What a step did for one sequence: the tokens it gained, with their logprobs."""

    seq: Sequence
    new_token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list | None = None

    @property
    def finished(self) -> bool:
        return self.seq.is_finished
