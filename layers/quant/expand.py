"""Matmuls of many tokens over quantized weights, as bfloat16 GEMMs on expanded tiles.

A prompt chunk (or a large batch) is arithmetic-bound: there oneDNN's bfloat16 GEMM, on a CPU
with AVX512_BF16 dot products, runs ~2x float32's and well ahead of the int8 GEMVs, which
multiply codes a few tokens at a time (the NF4 kernel 4x slower than bfloat16 at 512 tokens of
the 1B shape; BENCHMARKS.md). So past EXPAND_MIN_TOKENS tokens `ifq` (and `ifq_nf4` past
NF4_EXPAND_MIN_TOKENS, where its own kernel stops being faster) expand their
rows to bfloat16 a tile at a time (`shardserve_kernels::int8_expand` / `nf4_blocks_expand`,
expand.cpp: each value is the dequantized float32 weight cast to bfloat16), multiply the tile
and reuse its buffer for the next: the weights are read once, in their own bytes, and no
bfloat16 copy of a whole layer is ever held. The activations are rounded to bfloat16 and each
output too (oneDNN writes bfloat16): ~0.3 % of an output's size, as a bfloat16 model computes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from layers.quant.base import kernel_isa

# More rows than any compiled step takes (16 sequences, lookahead trees of 32 rows;
# shards/compiled_decode.py): a step shape that can run compiled computes the same eagerly, so
# lookahead verification stays identical to plain decoding. At 40 rows the expanded GEMM is
# already as fast or faster at most shapes (bench-kernels --rows 40, BENCHMARKS.md).
EXPAND_MIN_TOKENS = 33
# bfloat16 bytes per tile: 8 MiB measured best at 2,048 and 8,192 inputs (smaller tiles pay
# a call per tile, larger ones fall out of the cache before the GEMM reads them back).
EXPAND_TILE_BYTES = 8 * 2**20

_buffers = threading.local()


def expand_available() -> bool:
    """Whether the expansion kernels are registered and this CPU multiplies bfloat16 natively."""
    return kernel_isa() >= 2 and torch.cpu._is_avx512_bf16_supported()


def expands(layer, x: torch.Tensor, min_tokens: int = EXPAND_MIN_TOKENS) -> bool:
    """Whether this matmul takes the expanded path: at least `min_tokens` tokens, run eagerly (a
    compiled step keeps the GEMVs it was traced with), on a layer that chose it at load."""
    return (
        getattr(layer, "expand_gemm", False)
        and x.numel() >= min_tokens * x.shape[-1]
        and not torch.compiler.is_compiling()
    )


def _tile_buffer(elements: int) -> torch.Tensor:
    # One buffer per thread, kept: a fresh 8 MiB allocation is fresh pages every call.
    buf = getattr(_buffers, "tile", None)
    if buf is None or buf.numel() < elements:
        buf = _buffers.tile = torch.empty(elements, dtype=torch.bfloat16)
    return buf[:elements]


def expanded_matmul(
    x: torch.Tensor, rows: int, expand: Callable[[int, int, torch.Tensor], None], step: int = 1
) -> torch.Tensor:
    """x [M, K] @ W.T in float32, W [rows, K] written by `expand(start, end, out)` into a
    bfloat16 tile `out` [end - start, K]; tiles start at multiples of `step` rows."""
    k = x.shape[-1]
    xb = x.to(torch.bfloat16)
    tile = max(16, EXPAND_TILE_BYTES // (2 * k)) // step * step
    buf = _tile_buffer(min(tile, rows) * k).view(-1, k)
    if rows <= tile:
        expand(0, rows, buf)
        return F.linear(xb, buf).float()
    y = torch.empty(x.shape[0], rows, dtype=torch.float32)
    for start in range(0, rows, tile):
        end = min(rows, start + tile)
        out = buf[: end - start]
        expand(start, end, out)
        y[:, start:end] = F.linear(xb, out)
    return y


def int8_matmul(x: torch.Tensor, qweight, scale) -> torch.Tensor:
    def expand(start: int, end: int, out: torch.Tensor) -> None:
        torch.ops.shardserve_kernels.int8_expand(qweight[start:end], scale[start:end], out)

    return expanded_matmul(x, qweight.shape[0], expand)


def int8_blocks_matmul(x: torch.Tensor, blocks, scale) -> torch.Tensor:
    """x [M, K] @ (Q * scale).T for int8 rows in blocks of 16 (layers/quant/blocks.cpp)."""

    def expand(start: int, end: int, out: torch.Tensor) -> None:
        b0, b1 = start // 16, end // 16
        torch.ops.shardserve_kernels.int8_blocks_expand(blocks[b0:b1], scale[start:end], out)

    return expanded_matmul(x, blocks.shape[0] * 16, expand, step=16)


def nf4_blocks_matmul(x: torch.Tensor, blocks, scales, levels) -> torch.Tensor:
    """x [M, K] @ W.T for NF4 codes in blocks of 16 rows (layers/quant/blocks.cpp)."""

    def expand(start: int, end: int, out: torch.Tensor) -> None:
        b0, b1 = start // 16, end // 16
        torch.ops.shardserve_kernels.nf4_blocks_expand(blocks[b0:b1], scales[b0:b1], levels, out)

    return expanded_matmul(x, blocks.shape[0] * 16, expand, step=16)
