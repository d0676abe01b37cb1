"""What every model file shares: how it is built (`BuildContext`) and how checkpoint tensors map
onto its parameters (`WeightRule`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layers.attention.backend import AttentionBackend
from layers.linear import Split
from layers.parallel import ParallelContext
from layers.quant.base import QuantMode
from layers.quant.registry import get_quant_mode


@dataclass(frozen=True)
class BuildContext:
    pctx: ParallelContext
    dtype: torch.dtype
    device: torch.device
    backend: AttentionBackend
    max_position: int  # rotary tables cover positions [0, max_position)
    quantization: str = "none"
    fast_kernels: bool = True  # optional faster kernels that must agree with the plain path
    compiled_decode: bool = False  # decode steps may also run torch.compile'd
    cpu_kernels: bool = False  # the hand-written CPU kernels (shards/kernels.py) may be used

    def quant(self) -> QuantMode:
        return get_quant_mode(
            self.quantization, self.fast_kernels, self.compiled_decode, self.cpu_kernels
        )


@dataclass(frozen=True)
class WeightRule:
    """Checkpoint tensor → parameter. `{i}` in either name is the layer index.

    `slot` names the part of a fused parameter the tensor fills (`qkv:k` is slot "k" of
    `qkv_proj`). `fused` lists the slots a pre-fused checkpoint tensor holds, in order; the
    loader splits it by the slots' global sizes.
    """

    target: str
    split: Split
    slot: str = ""
    fused: tuple[str, ...] = ()


def call_layer(layer: torch.nn.Module, *args):
    """One decoder layer's forward: the seam where a compiled decode step swaps in its compiled
    version of the same call."""
    return layer(*args)
