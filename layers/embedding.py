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
from layers.quant.base import (
    ONEDNN_BATCH_HINT,
    QuantMode,
    fused_gemv,
    fused_gemv_fits,
    onednn_available,
    onednn_linear,
)

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
        # (int8 rows, one scale each) when a quantized tied head holds the rows instead
        self.int8_rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def slots(self) -> dict[str, int]:
        return {"": self.vocab_size}

    def checkpoint_shape(self, param: str, slot: str) -> tuple[int, ...]:
        return (self.vocab_size, self.weight.shape[1])

    def slice_for(self, param: str, slot: str) -> SliceSpec:
        if self.pctx.world_size == 1 and self.local_vocab_size == self.vocab_size:
            return WHOLE
        return SliceSpec(0, self.vocab_start, 0, self.vocab_end - self.vocab_start)

    def _rows(self, local_ids: torch.Tensor) -> torch.Tensor:
        if self.int8_rows is None:
            return F.embedding(local_ids, self.weight)
        q, scale = self.int8_rows
        return q[local_ids].to(self.weight.dtype) * scale[local_ids, None].to(self.weight.dtype)

    def forward_local(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.pctx.world_size == 1:
            return self._rows(input_ids)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(mine, input_ids - self.vocab_start, 0)
        return self._rows(local_ids) * mine.unsqueeze(-1).to(self.weight.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.pctx.all_reduce(self.forward_local(input_ids))


class _HeadMatmul(nn.Module):
    """The LM head's local matmul seen as a linear, so a quantization mode can own it. Its rows
    are this rank's vocab slice: output channels, like a column-parallel linear."""

    split = Split.COLUMN
    lm_head = True  # a mode keeps its rows as they are: a tied embedding looks rows up in them

    def __init__(self, weight: torch.Tensor, pctx: ParallelContext, quant: QuantMode) -> None:
        super().__init__()
        self.pctx = pctx
        self.quant = quant
        self.out_local, self.in_local = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)  # shares storage until finalize


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over this rank's vocab rows; `forward` gathers them into the full vocabulary.

    With `fast=True` on a float32 CPU, a oneDNN-packed copy of the weight serves the matmul
    (the plain weight stays: a tied embedding still looks rows up in it).
    """

    def __init__(self, *args, fast: bool = False, quant: QuantMode | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fast = fast
        self.packed_weight = None
        wanted = quant is not None and quant.name != "none" and quant.quantize_lm_head
        self.quant = quant if wanted else None
        # A memory mode (fp8, nf4) leaves the head float: a tied head then reads the embedding's
        # table rather than a packed second copy of it (108 MiB on the default model).
        self.memory_mode = quant is not None and quant.saves_memory and not wanted
        self.cpu_quant = None if quant is None or wanted else quant.cpu_lm_head_mode()
        self.quantized: _HeadMatmul | None = None
        self.normalize_rows = False  # Baichuan2's NormHead: unit-length rows

    tied = False
    # The embedding a tied head shares its rows with, in a tuple so that it is not registered
    # as a second parent's submodule.
    _tied_to: tuple[VocabParallelEmbedding, ...] = ()

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        assert embedding.weight.shape == self.weight.shape
        self.weight = embedding.weight
        self.tied = True
        self._tied_to = (embedding,)

    def finalize_weights(self) -> None:
        w = self.weight
        if self.quant is None and self.cpu_quant is not None and w.device.type == "cpu":
            self.quant = self.cpu_quant
        if self.normalize_rows:
            assert not self.tied, "a normalized head cannot share the embedding's rows"
            w.data = F.normalize(w.data.float(), dim=-1).to(w.dtype)
        if self.quant is not None:
            self.quantized = _HeadMatmul(w.data, self.pctx, self.quant)
            self.quant.finalize(self.quantized)
            # Logits stay float32: a bfloat16 GEMM would round them to 8 bits (near-ties of a
            # greedy pick then differ between a prompt and a decode step).
            self.quantized.expand_gemm = False
            q = getattr(self.quantized, "qweight", None)
            if self.tied and q is not None and q.dtype == torch.int8:
                # int8 rows with one scale each serve lookups as well (llama.cpp quantizes its
                # token embeddings too): the float table, 21 % of the default model, goes
                (embedding,) = self._tied_to
                embedding.int8_rows = (q, self.quantized.weight_scale)
            elif self.tied:  # a tied float weight still serves the embedding's lookups
                return
            self.weight.data = torch.empty(0, w.shape[1], dtype=w.dtype, device=w.device)
            return
        if self.tied and self.memory_mode:
            return
        if self.fast and w.device.type == "cpu" and w.dtype == torch.float32 and onednn_available():
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(w.data, ONEDNN_BATCH_HINT)

    def forward_local(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quant.apply(self.quantized, hidden, None)
        if self.packed_weight is not None:
            return onednn_linear(hidden, self.packed_weight, None, self.local_vocab_size)
        if fused_gemv_fits(hidden):  # a memory mode's tied float head, in a compiled step
            return fused_gemv(hidden, self.weight)
        return F.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # [num_tokens, hidden] -> [num_tokens, vocab_size]
        logits = self.pctx.all_gather_last_dim(self.forward_local(hidden))
        return logits[..., : self.vocab_size]
