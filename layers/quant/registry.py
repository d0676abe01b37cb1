"""Quantization modes by name (`QUANTIZATION`)."""

from __future__ import annotations

from layers.quant.base import NoQuant, QuantMode
from layers.quant.dequant import Fp8WeightOnly, Nf4WeightOnly
from layers.quant.int8 import Int8WeightOnly
from layers.quant.smoothquant import SmoothQuantW8A8

_MODES = {
    "none": NoQuant,
    "ifq": Int8WeightOnly,
    "fp8": Fp8WeightOnly,
    "ifq_nf4": Nf4WeightOnly,
    "smoothquant": SmoothQuantW8A8,
}
KNOWN_MODES = ("none", "ifq", "ifq_nf4", "fp8", "smoothquant", "auto")


class QuantConfigError(ValueError):
    """A quantization mode that cannot run here; the message says why."""


def get_quant_mode(
    name: str, fast: bool = False, compiled: bool = False, kernels: bool = False
) -> QuantMode:
    if name not in _MODES:
        if name == "auto":
            raise QuantConfigError(
                "quantization 'auto' names no mode by itself: resolve it for a model folder "
                "and device first (launcher.serve.resolve_quantization)"
            )
        raise QuantConfigError(f"unknown quantization {name!r} (known: {', '.join(KNOWN_MODES)})")
    return _MODES[name](fast, compiled, kernels)
