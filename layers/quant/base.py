"""The interface every quantization mode implements, and the unquantized mode `none`.

A mode owns the parameters of one linear's local (per-rank) matmul:
`create_weights` registers buffers for the local shape, `finalize` runs once after the loader
has filled them, `apply` computes `x @ W.T (+ bias)` for the local shard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuantMode:
    name = "abstract"

    def create_weights(
        self, layer: nn.Module, out_local: int, in_local: int, dtype: torch.dtype, device
    ) -> None:
        raise NotImplementedError

    def finalize(self, layer: nn.Module) -> None:
        """Called once when every slot of the layer is loaded."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class NoQuant(QuantMode):
    """Plain weights in the compute dtype: the reference every other mode is measured against."""

    name = "none"

    def create_weights(self, layer, out_local, in_local, dtype, device) -> None:
        layer.weight = nn.Parameter(
            torch.empty(out_local, in_local, dtype=dtype, device=device), requires_grad=False
        )

    def apply(self, layer, x, bias):
        return F.linear(x, layer.weight, bias)


def get_quant_mode(name: str) -> QuantMode:
    if name == "none":
        return NoQuant()
    raise ValueError(f"quantization mode {name!r} is not supported yet (known: none)")
