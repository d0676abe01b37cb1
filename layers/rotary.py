"""Rotary position embedding with the rope_scaling variants of Llama-family checkpoints.

`cos_sin(positions)` is computed once per step and shared by every layer; `apply` rotates q and k.
Supported `rope_type`s: default, linear, dynamic (NTK), llama3. Others raise `RopeScalingError`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RopeScalingError(ValueError):
    pass


def rope_type(scaling: dict | None) -> str:
    """The rope_scaling variant a config names (older configs spell the key `type`)."""
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def _inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        max_position: int,
        base: float,
        scaling: dict | None = None,
        max_position_embeddings: int | None = None,
        interleaved: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        if rotary_dim % 2 or rotary_dim > head_dim:
            raise RopeScalingError(
                f"rotary dim {rotary_dim} must be even and <= head dim {head_dim}"
            )
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.base = base
        self.interleaved = interleaved
        scaling = dict(scaling or {})
        self.rope_type = rope_type(scaling)
        inv_freq = _inv_freq(base, rotary_dim)
        if self.rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif self.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif self.rope_type == "dynamic":
            self.factor = float(scaling["factor"])
            self.original_max_len = int(
                scaling.get("original_max_position_embeddings") or max_position_embeddings
            )
        elif self.rope_type != "default":
            raise RopeScalingError(
                f"rope_scaling type {self.rope_type!r} is not supported "
                "(supported: default, linear, dynamic, llama3)"
            )
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        freqs = torch.outer(
            torch.arange(max_position, dtype=torch.float32, device=device), self.inv_freq
        )
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)

    @property
    def needs_seq_lens(self) -> bool:
        return self.rope_type == "dynamic"

    def cos_sin(
        self, positions: torch.Tensor, seq_lens: torch.Tensor | None = None, dtype=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[num_tokens, 1, rotary_dim / 2] each, ready to broadcast over heads; computed once
        per step. For dynamic NTK, `seq_lens[t]` is the length of token t's sequence after
        this step: the base grows with it past the original context length, the way the
        reference recomputes its frequencies for each forward."""
        if self.rope_type != "dynamic":
            cos, sin = self.cos_cache[positions], self.sin_cache[positions]
        else:
            assert seq_lens is not None
            dim = self.rotary_dim
            seq = torch.clamp(seq_lens.float(), min=self.original_max_len)
            base = self.base * (self.factor * seq / self.original_max_len - (self.factor - 1)) ** (
                dim / (dim - 2)
            )
            exponents = torch.arange(0, dim, 2, device=positions.device).float() / dim
            inv_freq = 1.0 / (base[:, None] ** exponents[None, :])  # [num_tokens, dim/2]
            freqs = positions.float()[:, None] * inv_freq
            cos, sin = freqs.cos(), freqs.sin()
        if dtype is not None and dtype != cos.dtype:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, num_heads, head_dim] (q and k heads may be stacked in one tensor)."""
        rot = x[..., : self.rotary_dim] if self.rotary_dim != self.head_dim else x
        if self.interleaved:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        if self.rotary_dim == self.head_dim:
            return out
        return torch.cat((out, x[..., self.rotary_dim :]), dim=-1)
