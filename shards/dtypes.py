"""The compute dtype a shard runs in: the flag when given, else the fastest one this device and
quantization mode compute natively."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("shardserve.worker")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DtypeError(ValueError):
    pass


def cpu_has_bf16_dot() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512_BF16; AMX-BF16 hosts have
    them too). Without them bfloat16 matmuls are emulated and run several times slower than
    float32."""
    return torch.cpu._is_avx512_bf16_supported()


def cpu_default_dtype(quantization: str) -> tuple[torch.dtype, str]:
    """The CPU default and why. Unquantized weights are read once per token, so halving their
    bytes with bfloat16 speeds every step where the CPU multiplies bfloat16 natively (measured
    on the embedded model, two runs: 1.09x and 1.30x single stream, 1.39x prefill,
    BENCHMARKS.md). Quantized modes keep float32 activations: their int8 and NF4 kernels take
    float32 inputs."""
    if quantization not in ("none", None):
        return torch.float32, f"quantization {quantization} computes with float32 activations"
    if cpu_has_bf16_dot():
        return torch.bfloat16, "this CPU has bfloat16 dot products (AVX512_BF16)"
    return torch.float32, "this CPU has no bfloat16 dot products (bfloat16 would be emulated)"


def resolve_dtype(
    requested: str | None,
    device: torch.device,
    checkpoint_dtype: str | None,
    quantization: str = "none",
) -> torch.dtype:
    """None → on CPU `cpu_default_dtype`, on GPU float16; "auto" → the checkpoint's dtype."""
    if requested is None:
        if device.type != "cpu":
            return torch.float16
        dtype, why = cpu_default_dtype(quantization)
        log.info("dtype %s (default on CPU: %s; --dtype overrides)", _name(dtype), why)
        return dtype
    name = requested
    if requested == "auto":
        name = checkpoint_dtype if checkpoint_dtype in DTYPES else "float32"
        if device.type == "cuda" and name == "float32":
            name = "float16"
    if name not in DTYPES:
        raise DtypeError(f"--dtype {requested!r} is not one of auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32 and not _native_on_cpu(dtype):
        log.warning("dtype %s on CPU: this CPU multiplies it slowly (no native support)", name)
    return dtype


def _native_on_cpu(dtype: torch.dtype) -> bool:
    if dtype == torch.bfloat16:
        return cpu_has_bf16_dot()
    return torch.cpu._is_amx_fp16_supported()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
