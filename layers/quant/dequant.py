"""Weight-only modes stored as codes: `fp8` (float8_e4m3fn, one scale per output channel) and
`ifq_nf4` (NF4 codes packed two per byte, one absmax scale per group of 64 inputs). They hold 1/4
and ~1/7 of float32's bytes. Compiled CPU decode steps of up to 4 rows read the codes inside
`fused_gemv`'s reduction (e4m3 converted, NF4 looked up per byte), which no float weight is built
for. On a CPU with AVX-512 VNNI every NF4 matmul of fewer than NF4_EXPAND_MIN_TOKENS (256) tokens
goes through a hand-written kernel instead: levels rounded to int8, activations to int8 twice over
per group of 64, as llama.cpp multiplies its 4-bit blocks (~0.6 % of a matmul's norm against the
exact levels; inductor's float lookup streamed the 1B shape's codes at well under 1 GB/s). There the
codes are kept in blocks of 16 rows (`to_blocks`; a layer whose outputs do not divide by 16 is
padded with rows of zero scale) for `shardserve_kernels::nf4_blocks_linear` (blocks.cpp: one
vpdpbusd lane per row, 1.6-1.8x a row-by-row kernel at one token). More tokens (long prompt chunks),
where the CPU has bfloat16 dot products, expand the codes to bfloat16 tile by tile for oneDNN's GEMM
(expand.py), which draws level with the kernel near 256 tokens. On CPU the LM head is int8 (`ifq`'s,
`cpu_lm_head_mode`). Every other matmul rebuilds the float weight first. The log says which at
start-up.

On GPUs with fp8 tensor cores (compute capability 8.9+), `fp8` with fast kernels runs the
large linears with `torch._scaled_mm` on the fp8 weight, each token's activations quantized to
fp8 on the fly with its own scale (W8A8: the activation rounding is the extra error, bound in
tests/shards/test_gpu.py). Below FP8_MM_MIN_WEIGHTS the kernel's fixed cost (~18 us with the
activation quantization, against ~8 us to dequantize) outweighs the bytes it saves
(BENCHMARKS.md, GPU).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from layers.quant.base import (
    QuantMode,
    drop_float_weight,
    float_weight,
    fused_gemv,
    fused_gemv_fits,
    kernel_isa,
    padded_rows,
    row_absmax,
)
from layers.quant.expand import expand_available, expands, nf4_blocks_matmul
from layers.quant.int8 import Int8WeightOnly

log = logging.getLogger("shardserve.quant")

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MM_MIN_WEIGHTS = 4 * 2**20  # weights per linear from which _scaled_mm beats dequantizing
NF4_GROUP = 64
# The 16 NF4 levels: quantiles of a standard normal, scaled to [-1, 1], with an exact zero.
NF4_LEVELS = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
)  # fmt: skip


class GroupSizeError(ValueError):
    """A layer whose inputs do not split into whole quantization groups."""


def _check_groups(layer, out_local: int, in_local: int) -> None:
    if in_local % NF4_GROUP:
        raise GroupSizeError(
            f"ifq_nf4 groups of {NF4_GROUP} inputs do not divide this rank's {in_local} "
            f"inputs of {type(layer).__name__} ({out_local}x{in_local})"
        )


DEQUANTIZED = "weights are dequantized at every step (memory saved, not time)"
NF4_KERNEL = (
    "every step multiplies the codes in bytes in a hand-written kernel (levels and activations "
    "rounded to int8); the LM head is int8"
)
NF4_KERNEL_EXPAND = (
    "steps of up to 32 tokens multiply the codes in bytes in a hand-written kernel (levels and "
    "activations rounded to int8), more tokens expand them to bfloat16 tile by tile for "
    "oneDNN's GEMM; the LM head is int8"
)
COMPILED_CODES = (
    "compiled decode steps of up to 4 rows read the codes in place; prompts and larger "
    "batches dequantize per step"
)
SCALED_MM = "fp8 tensor-core matmuls (torch._scaled_mm, per-token fp8 activations)"


def scaled_mm_supported(device: torch.device) -> bool:
    """fp8 tensor cores: Ada and Hopper (8.9+); older GPUs and CPUs dequantize."""
    return (
        device.type == "cuda"
        and hasattr(torch, "_scaled_mm")
        and torch.cuda.get_device_capability(device) >= (8, 9)
    )


class _Announced(QuantMode):
    _announced: set[tuple[str, str, str]] = set()
    # Measured on the embedded model: quantizing the LM head too doubles these modes' perplexity
    # loss (fp8 +4.2 % -> +8 %, nf4 +25 % -> +52 %), and dequantizing it saves no time.
    quantize_lm_head = False
    saves_memory = True

    def _announce(self, device: torch.device, how: str = DEQUANTIZED) -> None:
        key = (self.name, device.type, how)
        if key not in _Announced._announced:
            _Announced._announced.add(key)
            log.info("quantization %s on %s: %s", self.name, device.type, how)

    def _plain_how(self, device: torch.device) -> str:
        return COMPILED_CODES if self.compiled and device.type == "cpu" else DEQUANTIZED


# e4m3's grid repeats every power of two, so scales absmax / 448 times [1, 2) are every grid a
# row can take without clipping its largest weight. A coarse pass, then a finer one around the
# best coarse factor.
FP8_COARSE = 16
FP8_FINE = 8


def _fp8_row_errors(layer, w: torch.Tensor, base: torch.Tensor, factors) -> torch.Tensor:
    """[rows, factors]: each row's squared rounding error at each candidate scale, summed in
    float64 (and over ranks for a row-parallel layer's slices), so every TP size picks the
    same scale."""
    errors = torch.empty(w.shape[0], factors.shape[-1], dtype=torch.float64, device=w.device)
    for k in range(factors.shape[-1]):
        s = (base * factors[..., k])[:, None]
        diff = (w / s).to(torch.float8_e4m3fn).float().mul_(s).sub_(w)
        errors[:, k] = diff.square_().sum(1, dtype=torch.float64)
    if getattr(layer, "split", None) == "row":
        errors = layer.pctx.all_reduce(errors)
    return errors


def fp8_scales(layer, w: torch.Tensor) -> torch.Tensor:
    """Per output channel, the scale whose e4m3 grid lands nearest the row's weights (least
    squared error) among absmax / 448 times [1, 2). Measured on the embedded model, whose
    weights sit on another grid already (Q4_1): +1.85 % perplexity against +3.96 % for absmax
    scales alone (BENCHMARKS.md)."""
    base = (row_absmax(layer, w) / FP8_MAX).clamp(min=1e-12)
    step = 1.0 / FP8_COARSE
    coarse = torch.arange(FP8_COARSE, device=w.device, dtype=torch.float32) * step + 1.0
    best = coarse[_fp8_row_errors(layer, w, base, coarse).argmin(1)]  # [rows]
    fine = best[:, None] + (torch.arange(FP8_FINE, device=w.device) - FP8_FINE // 2) * (
        step / (FP8_FINE // 2)
    )
    fine = fine.clamp(1.0, 2.0 - step / FP8_FINE)
    factor = fine.gather(1, _fp8_row_errors(layer, w, base, fine).argmin(1, keepdim=True))
    return base * factor[:, 0]


class Fp8WeightOnly(_Announced):
    name = "fp8"

    def create_weights(self, layer, out_local, in_local, dtype, device) -> None:
        float_weight(layer, out_local, in_local, dtype, device)

    def finalize(self, layer) -> None:
        w = layer.weight.data
        w32 = w.float()
        scale = fp8_scales(layer, w32)
        layer.fp8_weight = (w32 / scale[:, None]).to(torch.float8_e4m3fn)
        layer.weight_scale = scale
        # _scaled_mm wants both matrix sizes it reduces over or writes to in multiples of 16.
        out_f, in_f = w.shape
        native = (
            self.fast
            and out_f * in_f >= FP8_MM_MIN_WEIGHTS
            and not (out_f % 16 or in_f % 16)
            and scaled_mm_supported(w.device)
        )
        layer.fp8_scale_row = scale[None, :].contiguous() if native else None  # [1, out]
        drop_float_weight(layer)
        self._announce(w.device, SCALED_MM if native else self._plain_how(w.device))

    def dequantized(self, layer) -> torch.Tensor:
        return layer.fp8_weight.float() * layer.weight_scale[:, None]

    def weight_bytes(self, layer) -> int:
        return layer.fp8_weight.numel() + layer.weight_scale.numel() * 4

    def apply(self, layer, x, bias):
        if layer.fp8_scale_row is not None:
            y = _fp8_scaled_mm(x, layer.fp8_weight, layer.fp8_scale_row)
        elif fused_gemv_fits(x):  # compiled decode: e4m3 codes convert inside the reduction
            y = fused_gemv(x, layer.fp8_weight.to(x.dtype)) * layer.weight_scale.to(x.dtype)
        else:
            w = layer.fp8_weight.to(x.dtype)
            y = F.linear(x, w) * layer.weight_scale.to(x.dtype)
        return y + bias if bias is not None else y


def _fp8_scaled_mm(x: torch.Tensor, fp8_weight: torch.Tensor, scale_row: torch.Tensor):
    """x @ (fp8_weight * scale).T with x rounded to fp8 per token. x: [..., in];
    fp8_weight: [out, in] row-major, which is the column-major [in, out] _scaled_mm takes."""
    flat = x.reshape(-1, x.shape[-1])
    x_scale = flat.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12).div_(FP8_MAX)
    xq = (flat.float() / x_scale).to(torch.float8_e4m3fn)
    # Row-wise scales take a bf16 output; another compute dtype is cast back.
    y = torch._scaled_mm(
        xq, fp8_weight.t(), scale_a=x_scale, scale_b=scale_row, out_dtype=torch.bfloat16
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


NF4_BLOCK_ROWS = 16  # rows the decode kernel multiplies at once (blocks.cpp)

# Below this many tokens the NF4 kernel beats expanding its rows to bfloat16: it multiplies
# every token with a block of 16 rows while the block is in cache, 330-360 GFLOP/s on the 1B
# shape from 40 to 256 tokens, where the expanded GEMM gives ~200 at 40 tokens, ~320 at 128 and
# draws level near 256 (bench-kernels --rows N, BENCHMARKS.md). Short prompts and mixed steps
# take the kernel, long prompt chunks the expansion.
NF4_EXPAND_MIN_TOKENS = 256


def to_blocks(codes: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes [N, K] and group scales [N, K / 64] in blocks.cpp's layout: per 16 rows
    and group, 8 runs of 64 bytes, byte (r, b) of run k holding row r's codes of inputs
    8k + b (low nibble) and 8k + 4 + b (high nibble); scales [N / 16, K / 64, 16]."""
    n, k = codes.shape
    g = k // NF4_GROUP
    c = codes.view(n // NF4_BLOCK_ROWS, NF4_BLOCK_ROWS, g, 8, 2, 4).permute(0, 2, 3, 1, 5, 4)
    blocks = (c[..., 0] | (c[..., 1] << 4)).contiguous()
    scales = scale.view(n // NF4_BLOCK_ROWS, NF4_BLOCK_ROWS, g).transpose(1, 2).contiguous()
    return blocks, scales


def nf4_codes(layer) -> torch.Tensor:
    """The layer's NF4 codes [N, K] (uint8, 0-15), from whichever layout it keeps."""
    if layer.nf4_blocks is None:
        packed = layer.nf4_packed
        return torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(packed.shape[0], -1)
    b = layer.nf4_blocks  # [N / 16, G, 8, 16, 4]
    c = torch.stack([b & 0x0F, b >> 4], dim=-1)  # [nb, g, run, row, byte, nibble]
    nb, g = b.shape[:2]
    return c.permute(0, 3, 1, 2, 5, 4).reshape(nb * NF4_BLOCK_ROWS, g * NF4_GROUP)[: layer.nf4_rows]


def nf4_scales(layer) -> torch.Tensor:
    """The layer's group scales [N, K / 64]."""
    if layer.nf4_blocks is None:
        return layer.nf4_scale
    s = layer.nf4_block_scales  # [N / 16, G, 16]
    return s.transpose(1, 2).reshape(-1, s.shape[1])[: layer.nf4_rows]


class Nf4WeightOnly(_Announced):
    name = "ifq_nf4"

    def cpu_lm_head_mode(self) -> QuantMode:
        # On CPU a float32 head is the largest read of a small model's step (113 MB of the
        # embedded model's ~190): int8 rows, as `ifq` keeps them, cost ~0.1 % perplexity where
        # NF4 rows cost +25 %, and a tied embedding then looks its rows up in them too.
        return Int8WeightOnly(self.fast, self.compiled, self.kernels)

    def create_weights(self, layer, out_local, in_local, dtype, device) -> None:
        _check_groups(layer, out_local, in_local)
        float_weight(layer, out_local, in_local, dtype, device)

    def finalize(self, layer) -> None:
        w = layer.weight.data.float()
        out_f, in_f = w.shape
        _check_groups(layer, out_f, in_f)
        groups = w.view(out_f, in_f // NF4_GROUP, NF4_GROUP)
        scale = groups.abs().amax(dim=2).clamp(min=1e-12)  # [out, in / 64]
        levels = NF4_LEVELS.to(w.device)
        mids = (levels[1:] + levels[:-1]) / 2
        codes = torch.bucketize(groups / scale[..., None], mids).to(torch.uint8).view(out_f, in_f)
        layer.nf4_levels = levels
        layer.nf4_kernel = self.kernels and w.device.type == "cpu" and kernel_isa() >= 2
        layer.expand_gemm = layer.nf4_kernel and expand_available()
        layer.nf4_packed = layer.nf4_scale = layer.nf4_blocks = layer.nf4_block_scales = None
        layer.nf4_rows = out_f
        if layer.nf4_kernel:
            rows = -(-out_f // NF4_BLOCK_ROWS) * NF4_BLOCK_ROWS
            layer.nf4_blocks, layer.nf4_block_scales = to_blocks(
                padded_rows(codes, rows), padded_rows(scale, rows)
            )
        else:
            layer.nf4_packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
            layer.nf4_scale = scale
        drop_float_weight(layer)
        how = self._plain_how(w.device)
        if layer.nf4_kernel:
            how = NF4_KERNEL_EXPAND if layer.expand_gemm else NF4_KERNEL
        self._announce(w.device, how)

    def dequantized(self, layer) -> torch.Tensor:
        if layer.nf4_blocks is not None:
            w = layer.nf4_levels[nf4_codes(layer).long()].view(nf4_scales(layer).shape + (-1,))
            return (w * nf4_scales(layer)[..., None]).flatten(1)
        packed = layer.nf4_packed
        levels = layer.nf4_levels
        # Two lookups, then interleaved, rather than unpacking codes first: compiled, this is
        # one expression that inductor folds into `fused_gemv`'s reduction (4-bit codes stream
        # from memory as bytes; an unpacked int64 code tensor is never built).
        lo, hi = levels[(packed & 0x0F).long()], levels[(packed >> 4).long()]
        w = torch.stack([lo, hi], dim=-1).view(packed.shape[0], -1, NF4_GROUP)
        return (w * layer.nf4_scale[..., None]).view(packed.shape[0], -1)

    def weight_bytes(self, layer) -> int:
        if layer.nf4_blocks is not None:
            return layer.nf4_blocks.numel() + layer.nf4_block_scales.numel() * 4
        return layer.nf4_packed.numel() + layer.nf4_scale.numel() * 4

    def apply(self, layer, x, bias):
        flat = x.reshape(-1, x.shape[-1])
        if layer.nf4_blocks is not None:
            blocks, scales, levels = layer.nf4_blocks, layer.nf4_block_scales, layer.nf4_levels
            if expands(layer, flat, NF4_EXPAND_MIN_TOKENS):
                y = nf4_blocks_matmul(flat, blocks, scales, levels)
            else:
                y = torch.ops.shardserve_kernels.nf4_blocks_linear(
                    flat.float(), blocks, scales, levels
                )
            if y.shape[-1] != layer.nf4_rows:  # the padding rows' zeros
                y = y[:, : layer.nf4_rows]
            y = y.to(x.dtype).reshape(*x.shape[:-1], layer.nf4_rows)
        elif fused_gemv_fits(x):
            y = fused_gemv(x, self.dequantized(layer).to(x.dtype))
        else:
            return F.linear(x, self.dequantized(layer).to(x.dtype), bias)
        return y + bias if bias is not None else y
