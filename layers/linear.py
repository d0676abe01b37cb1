"""Tensor-parallel linear layers.

Constructors take global sizes and compute `local_` shapes. Each layer answers, for a checkpoint
slot, which slice of the checkpoint tensor this rank needs and where it lands in its parameter
(`slice_for`); the loader in `shards/` does the reading.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from layers.parallel import SINGLE, ParallelContext, ShardingError, divide
from layers.quant.base import NoQuant, QuantMode


class Split(str, Enum):
    COLUMN = "column"  # output features split across ranks
    ROW = "row"  # input features split; partial outputs all-reduced
    REPLICATED = "replicated"
    VOCAB = "vocab"  # vocabulary rows split (embedding, LM head)


@dataclass(frozen=True)
class SliceSpec:
    """This rank's part of a checkpoint tensor: `length` entries along `dim` from `src_start`,
    copied to the parameter along the same dim from `dst_start`. `dim=None` copies it whole."""

    dim: int | None
    src_start: int = 0
    dst_start: int = 0
    length: int = 0


WHOLE = SliceSpec(dim=None)

# Quantized checkpoints store a linear as several tensors: these slice like the weight (rows =
# outputs) or like the bias (one entry per output); INPUT_VECTOR has one entry per input.
_ROLE = {"qweight": "weight", "weight_scale": "bias"}
INPUT_VECTOR = "smooth"


class ParallelLinear(nn.Module):
    split: Split

    def __init__(
        self,
        in_local: int,
        out_local: int,
        bias_size: int | None,
        pctx: ParallelContext,
        quant: QuantMode | None,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.pctx = pctx
        self.in_local = in_local
        self.out_local = out_local
        self.quant = quant or NoQuant()
        self.quant.create_weights(self, out_local, in_local, dtype, device)
        self.bias = (
            nn.Parameter(torch.empty(bias_size, dtype=dtype, device=device), requires_grad=False)
            if bias_size is not None
            else None
        )

    def slots(self) -> dict[str, int]:
        """Checkpoint slots fused into this layer and their global output sizes."""
        return {"": self.out_local * self.pctx.world_size}

    def slice_for(self, param: str, slot: str) -> SliceSpec:
        if param == INPUT_VECTOR:
            return self._input_slice()
        return self._slice(_ROLE.get(param, param), slot)

    def _slice(self, param: str, slot: str) -> SliceSpec:
        raise NotImplementedError

    def _input_slice(self) -> SliceSpec:
        return WHOLE  # every rank sees all input features

    def checkpoint_shape(self, param: str, slot: str) -> tuple[int, ...]:
        """The full (unsliced) shape a checkpoint tensor for `param`/`slot` must have."""
        if param == INPUT_VECTOR:
            return (self.in_local,)
        param = _ROLE.get(param, param)
        rows = self.slots()[slot]
        return (rows, self.in_local) if param == "weight" else (rows,)

    def finalize_weights(self) -> None:
        """Called by the loader once every slot is filled."""
        self.quant.finalize(self)

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contribution, before any communication."""
        return self.quant.apply(self, x, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_local(x)


class ColumnParallelLinear(ParallelLinear):
    """Y = X W^T with W's rows (output features) split; each rank keeps its output slice."""

    split = Split.COLUMN

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        pctx: ParallelContext = SINGLE,
        quant: QuantMode | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        gather_output: bool = False,
    ) -> None:
        out_local = divide(output_size, pctx.world_size, "output features")
        super().__init__(
            input_size, out_local, out_local if bias else None, pctx, quant, dtype, device
        )
        self.gather_output = gather_output

    def _slice(self, param: str, slot: str) -> SliceSpec:
        if self.pctx.world_size == 1:
            return WHOLE
        n = self.out_local
        return SliceSpec(dim=0, src_start=self.pctx.rank * n, dst_start=0, length=n)

    def forward(self, x):
        y = self.forward_local(x)
        return self.pctx.all_gather_last_dim(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate and up): each slot split on its own."""

    def __init__(
        self,
        input_size: int,
        output_sizes: dict[str, int],
        bias: bool = False,
        pctx: ParallelContext = SINGLE,
        quant: QuantMode | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.output_sizes = dict(output_sizes)
        for slot, size in self.output_sizes.items():
            divide(size, pctx.world_size, f"output features of {slot}")
        super().__init__(input_size, sum(output_sizes.values()), bias, pctx, quant, dtype, device)

    def slots(self) -> dict[str, int]:
        return dict(self.output_sizes)

    def local_sizes(self) -> list[int]:
        return [s // self.pctx.world_size for s in self.output_sizes.values()]

    def _slice(self, param: str, slot: str) -> SliceSpec:
        names = list(self.output_sizes)
        if slot not in names:
            raise KeyError(f"unknown slot {slot!r} (slots: {names})")
        idx = names.index(slot)
        local = self.local_sizes()
        return SliceSpec(
            dim=0,
            src_start=self.pctx.rank * local[idx],
            dst_start=sum(local[:idx]),
            length=local[idx],
        )


class QKVParallelLinear(ColumnParallelLinear):
    """Fused Q, K, V projections split by attention head.

    When there are fewer KV heads than ranks, each KV head is replicated on
    `world_size // num_key_value_heads` consecutive ranks.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_key_value_heads: int,
        bias: bool = False,
        pctx: ParallelContext = SINGLE,
        quant: QuantMode | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        ws = pctx.world_size
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads
        self.local_num_heads = divide(num_heads, ws, "attention heads")
        if ws >= num_key_value_heads:
            if ws % num_key_value_heads:
                raise ShardingError(
                    f"{num_key_value_heads} KV heads do not divide tensor parallel size {ws}"
                )
            self.local_num_kv_heads = 1
            self.kv_head_start = pctx.rank // (ws // num_key_value_heads)
        else:
            self.local_num_kv_heads = divide(num_key_value_heads, ws, "KV heads")
            self.kv_head_start = pctx.rank * self.local_num_kv_heads
        q_local = self.local_num_heads * head_dim
        kv_local = self.local_num_kv_heads * head_dim
        out_local = q_local + 2 * kv_local
        ParallelLinear.__init__(
            self, hidden_size, out_local, out_local if bias else None, pctx, quant, dtype, device
        )
        self.gather_output = False

    def slots(self) -> dict[str, int]:
        kv = self.num_key_value_heads * self.head_dim
        return {"q": self.num_heads * self.head_dim, "k": kv, "v": kv}

    def local_sizes(self) -> list[int]:
        kv = self.local_num_kv_heads * self.head_dim
        return [self.local_num_heads * self.head_dim, kv, kv]

    def _slice(self, param: str, slot: str) -> SliceSpec:
        q_local, kv_local, _ = self.local_sizes()
        d = self.head_dim
        if slot == "q":
            return SliceSpec(0, self.pctx.rank * q_local, 0, q_local)
        if slot == "k":
            return SliceSpec(0, self.kv_head_start * d, q_local, kv_local)
        if slot == "v":
            return SliceSpec(0, self.kv_head_start * d, q_local + kv_local, kv_local)
        raise KeyError(f"unknown slot {slot!r} (slots: q, k, v)")


class RowParallelLinear(ParallelLinear):
    """Y = X W^T with W's columns (input features) split; partial sums are all-reduced.

    The bias is whole on every rank but added on rank 0 only, so the all-reduce adds it once.
    """

    split = Split.ROW

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        pctx: ParallelContext = SINGLE,
        quant: QuantMode | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        in_local = divide(input_size, pctx.world_size, "input features")
        super().__init__(
            in_local, output_size, output_size if bias else None, pctx, quant, dtype, device
        )

    def _slice(self, param: str, slot: str) -> SliceSpec:
        if self.pctx.world_size == 1 or param == "bias":
            return WHOLE
        n = self.in_local
        return SliceSpec(dim=1, src_start=self.pctx.rank * n, dst_start=0, length=n)

    def _input_slice(self) -> SliceSpec:
        if self.pctx.world_size == 1:
            return WHOLE
        n = self.in_local
        return SliceSpec(dim=0, src_start=self.pctx.rank * n, dst_start=0, length=n)

    def slots(self) -> dict[str, int]:
        return {"": self.out_local}  # outputs are whole on every rank

    def checkpoint_shape(self, param: str, slot: str) -> tuple[int, ...]:
        if param == INPUT_VECTOR:
            return (self.in_local * self.pctx.world_size,)
        if _ROLE.get(param, param) == "bias":
            return (self.out_local,)
        return (self.out_local, self.in_local * self.pctx.world_size)

    def forward_local(self, x):
        bias = self.bias if self.pctx.rank == 0 else None
        return self.quant.apply(self, x, bias)

    def forward(self, x):
        return self.pctx.all_reduce(self.forward_local(x))
