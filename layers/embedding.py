"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous range of vocab rows.

The per-rank row count is padded up to a multiple of 16 so every rank has the same shape; padded
rows are zero and their logits are cut off after the gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers.linear import WHOLE, SliceSpec, Split
from layers.parallel import SINGLE, ParallelContext

_ROW_ALIGN = 16


class VocabParallelEmbedding(nn.Module):
    split = Split.VOCAB

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        pctx: ParallelContext = SINGLE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.pctx = pctx
        self.vocab_size = vocab_size
        per_rank = -(-vocab_size // pctx.world_size)
        self.local_vocab_size = -(-per_rank // _ROW_ALIGN) * _ROW_ALIGN
        self.vocab_start = min(vocab_size, pctx.rank * self.local_vocab_size)
        self.vocab_end = min(vocab_size, self.vocab_start + self.local_vocab_size)
        weight = torch.empty(self.local_vocab_size, hidden_size, dtype=dtype, device=device)
        weight[self.vocab_end - self.vocab_start :].zero_()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def slots(self) -> dict[str, int]:
        return {"": self.vocab_size}

    def checkpoint_shape(self, param: str, slot: str) -> tuple[int, ...]:
        return (self.vocab_size, self.weight.shape[1])

    def slice_for(self, param: str, slot: str) -> SliceSpec:
        if self.pctx.world_size == 1 and self.local_vocab_size == self.vocab_size:
            return WHOLE
        return SliceSpec(0, self.vocab_start, 0, self.vocab_end - self.vocab_start)

    def forward_local(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.pctx.world_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(mine, input_ids - self.vocab_start, 0)
        return F.embedding(local_ids, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.pctx.all_reduce(self.forward_local(input_ids))


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over this rank's vocab rows; `forward` gathers them into the full vocabulary."""

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        assert embedding.weight.shape == self.weight.shape
        self.weight = embedding.weight

    def forward_local(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # [num_tokens, hidden] -> [num_tokens, vocab_size]
        logits = self.pctx.all_gather_last_dim(self.forward_local(hidden))
        return logits[..., : self.vocab_size]
