"""Gated activations over a fused [gate | up] projection output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_tokens, 2 * local_intermediate] -> [num_tokens, local_intermediate]
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
