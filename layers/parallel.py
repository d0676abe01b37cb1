"""Tensor-parallel context and the collectives the sharded layers call.

Layers never initialise process groups: they receive a `ParallelContext` and only communicate
when `world_size > 1`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class ShardingError(ValueError):
    """A size that cannot be split evenly across the tensor-parallel ranks."""


def divide(numerator: int, denominator: int, what: str) -> int:
    if denominator <= 0 or numerator % denominator:
        raise ShardingError(
            f"tensor parallel size {denominator} does not divide {numerator} {what}"
        )
    return numerator // denominator


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # torch.distributed ProcessGroup; None means the default group
    # Tensors up to this many elements are all-reduced as an all-gather and a local sum: over
    # gloo one gather round trip is ~1.8x faster than its ring all-reduce for a decode step's
    # activations (BENCHMARKS.md). 0 = always the backend's all-reduce.
    gather_reduce_max: int = 0

    def __post_init__(self) -> None:
        assert 0 <= self.rank < self.world_size, (self.rank, self.world_size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks; every rank gets the same bits."""
        if self.world_size == 1:
            return x
        if x.numel() <= self.gather_reduce_max:
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            dist.all_gather(parts, x.contiguous(), group=self.group)
            return torch.stack(parts).sum(0)
        dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = ParallelContext()
