"""`ifq`: int8 weight-only, symmetric, one scale per output channel.

Online: the loader fills a float weight for the local shard; `finalize` quantizes it and frees
the float copy. A row-parallel layer's scales are maxima over the *whole* row (all ranks), so
every TP size stores the same int8 values and scales.

The oracle is plain torch: `(x @ q.T) * scale`. On a CPU with AVX-512 VNNI and the kernels built,
decoder linears keep their rows in blocks of 16 for `int8_blocks_linear` (layers/quant/blocks.cpp;
`Int8WeightOnly` says which); for the others one int8 copy serves every fast path on CPU:
`int8_two_pass` rounds the activations to int8 twice over (~15 bits) and multiplies them with
the weights in exact int32 sums: up to KERNEL_MAX_TOKENS tokens (decode steps) through the
hand-written GEMV `shardserve_kernels::int8_linear` (gemv.cpp, built by shards/kernels.py), more
through torch's int8 GEMM (`torch._int_mm`, oneDNN), the two bit-identical; the rounding and
recombination compiled around them where decode steps compile. Where the kernel is not built
(no C++ compiler), compiled steps of up to 4 rows multiply float activations with `fused_gemv`.
Eager matmuls of 33 tokens or more (prompt chunks, large batches), on a CPU with bfloat16 dot
products, expand the int8 rows to bfloat16 tile by tile for oneDNN's GEMM instead (expand.py).

On CUDA, fast or not, the int8 weight is cast to the compute dtype for cuBLAS: torch's CUDA
`_weight_int8pack_mm` measured 2-10x slower than that on an H100 at every decode shape
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
from layers.quant.expand import expand_available, expands, int8_blocks_matmul, int8_matmul

log = logging.getLogger("shardserve.quant")

QMAX = 127


def int8_matmul_available() -> bool:
    """Whether this CPU build has a fast int8 GEMM behind `torch._int_mm` (oneDNN's)."""
    return torch.backends.mkldnn.is_available()


# Tokens (two rows of codes each) up to which the hand-written GEMV beats oneDNN's GEMM: it
# streams the weights once at near the memory's read rate, where oneDNN reads them at a third to
# a half of it below ~16 rows (BENCHMARKS.md, int8 GEMV).
KERNEL_MAX_TOKENS = 8
# Layers whose rows hold at least this many inputs go through it. A shorter row is too little
# work per row and per call (the embedded model's 576: a compiled step's own reduction,
# `fused_gemv`, was as fast or faster, BENCHMARKS.md); from 2,048 inputs on it streams the
# weights at ~25 GB/s where `fused_gemv` reaches 8-20.
KERNEL_MIN_IN = 2048


def uses_int8_kernel(mode: QuantMode, layer) -> bool:
    """For a layer whose int8 GEMM path is on (`layer.int8_gemm`): whether its few-token
    matmuls go through the hand-written GEMV."""
    return layer.int8_gemm and mode.kernels and layer.in_local >= KERNEL_MIN_IN and kernel_isa() > 0


def quantize_rows(w: torch.Tensor, row_absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and float32 scales for `w` [out, in] given each row's absolute maximum."""
    scale = (row_absmax.float() / QMAX).clamp(min=1e-12)
    q = torch.round(w.float() / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def token_absmax(x: torch.Tensor) -> torch.Tensor:
    # abs + amax: ~6x faster here than vector_norm(inf) at decode sizes
    return x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-30)


# Rows per int8 GEMM call on the eager path: past a few hundred rows (a prompt chunk), the
# doubled rows, their int32 results and the float recombination (a dozen separate ops) fall out
# of cache; in slices of 128 tokens the eager path stays near oneDNN's float32 GEMM.
TWO_PASS_ROWS = 128


def _two_pass(flat: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(flat @ qweight.T) * scale through one int8 GEMM, at ~15-bit activation precision.

    Each token is scaled onto the int8 grid and rounded; its rounding error (at most half a
    step) is scaled onto the grid again and sent through the same call as extra rows, so the
    weights stream once. The two integer results recombine in float32. (One pass alone costs
    +4.6 % perplexity on the default model, where two cost +0.27 %.)"""
    flat = flat.float()
    m = flat.shape[0]
    step = token_absmax(flat) / QMAX
    u = flat / step
    compiling = torch.compiler.is_compiling()
    if compiling:
        # One materialized u for both uses: inductor would otherwise recompute it for each,
        # possibly a bit differently, and the error pass must see what the first rounded.
        u = torch.ops.prims.inductor_force_stride_order.default(u, (u.shape[1], 1))
    hi = torch.round(u)
    lo = u - hi
    lo_step = token_absmax(lo) / QMAX
    codes = torch.cat([hi, torch.round(lo / lo_step)]).to(torch.int8)
    acc = torch._int_mm(codes, qweight.t())
    if compiling:  # one fused pass over the int32 sums
        return (acc[:m].float() + acc[m:].float() * lo_step) * (step * scale)
    acc = acc.float()
    return torch.addcmul(acc[:m], acc[m:], lo_step).mul_(step).mul_(scale)


class _CompiledTwoPass:
    """`_two_pass` compiled once for every shape (rows, and the weights', are symbolic): the
    rounding becomes one C++ loop before the GEMM and the recombination one after it, where
    eagerly they are a dozen passes. Prompt chunks then run int8 at ~1.25x float32's speed
    (eagerly ~0.6-0.9x). If compiling fails (no C++ compiler), eager from then on."""

    def __init__(self) -> None:
        self.fn = torch.compile(_two_pass, dynamic=True, options={"size_asserts": False})
        self.failed: str | None = None

    def __call__(self, flat, qweight, scale) -> torch.Tensor | None:
        if self.failed is not None:
            return None
        try:
            return self.fn(flat, qweight, scale)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("compiling the int8 GEMM failed (%s); it runs eagerly", self.failed)
            return None


COMPILED_TWO_PASS = _CompiledTwoPass()


def int8_two_pass(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    compiled: bool = False,
    kernel: bool = False,
) -> torch.Tensor:
    """(x @ qweight.T) * scale for int8 qweight [out, in] and float32 scale [out], via
    `_two_pass`: inlined in a compiled step, else compiled on its own when `compiled`, else
    eagerly in slices of TWO_PASS_ROWS. `kernel`: the int8 GEMV is registered (few tokens)."""
    flat = x.reshape(-1, x.shape[-1])
    m = flat.shape[0]
    y = None
    if kernel and m <= KERNEL_MAX_TOKENS:  # the same rounding and sums, in one call
        y = torch.ops.shardserve_kernels.int8_linear(flat.float(), qweight, scale)
    elif torch.compiler.is_compiling():
        y = _two_pass(flat, qweight, scale)
    elif compiled:
        y = COMPILED_TWO_PASS(flat, qweight, scale)
    if y is None:
        if m <= TWO_PASS_ROWS:
            y = _two_pass(flat, qweight, scale)
        else:
            y = flat.new_empty(m, qweight.shape[0], dtype=torch.float32)
            for start in range(0, m, TWO_PASS_ROWS):
                end = start + TWO_PASS_ROWS
                y[start:end] = _two_pass(flat[start:end], qweight, scale)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


@torch.inference_mode()  # as steps run: grad mode is part of a graph
def warm_up(model: torch.nn.Module) -> None:
    """Compile the int8 GEMM now (for one row and for many; past the GEMV kernel's rows where it
    runs) rather than on the first prompt."""
    for layer in model.modules():
        if getattr(layer, "int8_gemm", False) and layer.quant.compiled:
            for rows in (1, 2, KERNEL_MAX_TOKENS + 1, KERNEL_MAX_TOKENS + 2):
                layer.quant.apply(layer, torch.zeros(rows, layer.in_local), None)
            return  # one graph serves every layer


# Below this many tokens a layer in blocks multiplies in bytes (`int8_blocks_linear`), from it on
# it expands its rows to bfloat16 for oneDNN's GEMM: the NF4 kernel's crossover
# (dequant.py: NF4_EXPAND_MIN_TOKENS), the arithmetic per weight being the same.
INT8_EXPAND_MIN_TOKENS = 256
BLOCK_ROWS, BLOCK_GROUP = 16, 64


def to_blocks(q: torch.Tensor) -> torch.Tensor:
    """int8 rows [N, K] (N a multiple of 16, K of 64) in blocks.cpp's layout: uint8 [N / 16,
    K / 64, 16, 16, 4], byte (k, r, b) of group g of a block holding q[r][64 g + 4 k + b] + 128
    (VNNI multiplies unsigned bytes by signed ones: the kernel takes the 128 back out)."""
    n, k = q.shape
    b = (q.to(torch.int16) + 128).to(torch.uint8)
    return b.view(n // BLOCK_ROWS, BLOCK_ROWS, k // BLOCK_GROUP, 16, 4).permute(0, 2, 3, 1, 4)


def from_blocks(blocks: torch.Tensor, rows: int) -> torch.Tensor:
    """The int8 rows [rows, K] that `to_blocks` laid out."""
    nb, g = blocks.shape[:2]
    q = blocks.permute(0, 3, 1, 2, 4).reshape(nb * BLOCK_ROWS, g * BLOCK_GROUP)
    return (q.to(torch.int16) - 128).to(torch.int8)[:rows]


class Int8WeightOnly(QuantMode):
    """On a float32 CPU with AVX-512 VNNI and the kernels built, a decoder linear whose inputs
    divide by 64 keeps its int8 rows in blocks of 16 (`to_blocks`; outputs padded with rows of
    scale 0) for `int8_blocks_linear`, which multiplies every step of fewer than
    INT8_EXPAND_MIN_TOKENS tokens, decode or mixed, compiled or not, in one way; longer prompt
    chunks expand the blocks to bfloat16. The LM head keeps plain rows: a tied embedding looks
    its rows up in them."""

    name = "ifq"

    def create_weights(self, layer, out_local, in_local, dtype, device) -> None:
        float_weight(layer, out_local, in_local, dtype, device)

    def finalize(self, layer) -> None:
        w = layer.weight.data
        layer.qweight, scale = quantize_rows(w, row_absmax(layer, w))
        layer.weight_scale = scale.to(w.dtype if w.device.type != "cpu" else torch.float32)
        cpu_float = self.fast and w.device.type == "cpu" and w.dtype == torch.float32
        layer.int8_blocks = None
        if (
            cpu_float
            and self.kernels
            and kernel_isa() >= 2
            and w.shape[1] % BLOCK_GROUP == 0
            and not getattr(layer, "lm_head", False)
        ):
            rows = -(-w.shape[0] // BLOCK_ROWS) * BLOCK_ROWS
            layer.int8_blocks = to_blocks(padded_rows(layer.qweight, rows)).contiguous()
            layer.block_scale = padded_rows(layer.weight_scale, rows)
            layer.int8_rows = w.shape[0]
            layer.qweight = None
        layer.int8_gemm = cpu_float and layer.int8_blocks is None and int8_matmul_available()
        layer.int8_kernel = uses_int8_kernel(self, layer)
        blocks_or_gemm = layer.int8_gemm or layer.int8_blocks is not None
        layer.expand_gemm = blocks_or_gemm and self.kernels and expand_available()
        drop_float_weight(layer)

    def int8_values(self, layer) -> torch.Tensor:
        """The layer's int8 values [out, in], from whichever layout it keeps."""
        if layer.int8_blocks is None:
            return layer.qweight
        return from_blocks(layer.int8_blocks, layer.int8_rows)

    def dequantized(self, layer) -> torch.Tensor:
        """The float weight the int8 values stand for (the test oracle)."""
        return self.int8_values(layer).float() * layer.weight_scale.float()[:, None]

    def weight_bytes(self, layer) -> int:
        out_features = layer.weight_scale.numel()
        return out_features * layer.in_local + out_features * 4

    def apply(self, layer, x, bias):
        if layer.int8_blocks is not None:
            y = self._blocks(layer, x)
        elif expands(layer, x):
            flat = x.reshape(-1, x.shape[-1])
            y = int8_matmul(flat, layer.qweight, layer.weight_scale)
            y = y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
        elif fused_gemv_fits(x) and not layer.int8_kernel:
            y = fused_gemv(x, layer.qweight.to(x.dtype)) * layer.weight_scale
        elif layer.int8_gemm:
            qweight, scale = layer.qweight, layer.weight_scale
            y = int8_two_pass(x, qweight, scale, self.compiled, layer.int8_kernel)
        else:
            y = F.linear(x, layer.qweight.to(x.dtype)) * layer.weight_scale.to(x.dtype)
        return y + bias if bias is not None else y

    def _blocks(self, layer, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        blocks, scale = layer.int8_blocks, layer.block_scale
        if expands(layer, flat, INT8_EXPAND_MIN_TOKENS):
            y = int8_blocks_matmul(flat, blocks, scale)
        else:
            y = torch.ops.shardserve_kernels.int8_blocks_linear(flat.float(), blocks, scale)
        if y.shape[-1] != layer.int8_rows:  # the padding rows' zeros
            y = y[:, : layer.int8_rows]
        return y.to(x.dtype).reshape(*x.shape[:-1], layer.int8_rows)
