"""`shardserve bench-kernels`: how fast each path a step can take runs a linear, per linear
shape of a model, in one run: for a decode step's few tokens (`--rows` up to 8) GB/s of weight
bytes, for more (prompt chunks, large batches) GFLOP/s.

    float32     oneDNN's packed linear, as `none` serves float32 on CPU
    bfloat16    F.linear on bfloat16 weights
    int8 fused  the compiled multiply-and-sum over int8 weights (`fused_gemv`, float activations)
    int8 onednn the two-pass int8 rounding through torch._int_mm (oneDNN's int8 GEMM)
    int8 kernel the hand-written GEMV, `shardserve_kernels::int8_linear` (shards/kernels.py)
    int8 blocks the hand-written int8 matmul 16 rows at a time,
                `shardserve_kernels::int8_blocks_linear`
    nf4 kernel  the hand-written NF4 GEMV in bytes, 16 rows at a time,
                `shardserve_kernels::nf4_blocks_linear`
    int8 expand, nf4 expand
                rows expanded to bfloat16 tile by tile for oneDNN's GEMM (layers/quant/expand.py)

Each path runs over enough distinct weights of a shape (`--total-mib`) that they come from
memory, not from cache, as a real step's do; the best of a few passes counts.
"""

from __future__ import annotations

import argparse
import logging
import time

from benchmarks.common import write_report
from benchmarks.shapes import SHAPES, VOCAB

log = logging.getLogger("shardserve.bench")


def linear_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """(out, in) of every distinct linear of a decoder layer, and the LM head."""
    s = SHAPES[shape]
    hidden, inter = s["hidden_size"], s["intermediate_size"]
    kv = s["num_key_value_heads"] * hidden // s["num_attention_heads"]
    return {
        "qkv": (hidden + 2 * kv, hidden),
        "o": (hidden, hidden),
        "gate_up": (2 * inter, hidden),
        "down": (hidden, inter),
        "lm_head": (VOCAB, hidden),
    }


# The most rows each path takes: the fused reduction's accumulators spill past 4, the int8
# GEMV takes 8 tokens (16 rows of codes, gemv.cpp kMaxRows).
MAX_ROWS = {"int8 fused": 4, "int8 kernel": 8}
GEMV_ROWS = 8  # up to here the table gives GB/s of weight bytes, past it GFLOP/s


def _nf4_codes(w):
    """NF4 codes [N, K] and group scales of a float weight, as `ifq_nf4` rounds them."""
    import torch

    from layers.quant.dequant import NF4_GROUP, NF4_LEVELS

    groups = w.view(w.shape[0], -1, NF4_GROUP)
    scale = groups.abs().amax(dim=2).clamp(min=1e-12)
    mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
    codes = torch.bucketize(groups / scale[..., None], mids).to(torch.uint8).view(w.shape)
    return codes, scale, NF4_LEVELS


def _nf4_blocks(w):
    from layers.quant.dequant import to_blocks

    codes, scale, levels = _nf4_codes(w)
    return (*to_blocks(codes, scale), levels)


def _int8_blocks(w):
    from layers.quant.int8 import quantize_rows, to_blocks

    q, scale = quantize_rows(w, w.abs().amax(dim=1))
    return to_blocks(q).contiguous(), scale


def _paths(kernel: bool, rows: int) -> dict:
    """name -> (prepare a float weight, run one input), with weight bytes per element."""
    import torch
    import torch.nn.functional as F

    from layers.quant import expand
    from layers.quant.base import ONEDNN_BATCH_HINT, fused_gemv, kernel_isa, onednn_linear
    from layers.quant.int8 import _two_pass, quantize_rows

    def int8(w):
        return quantize_rows(w, w.abs().amax(dim=1))

    fused = torch.compile(lambda x, q, s: fused_gemv(x, q.to(x.dtype)) * s, dynamic=False)
    paths = {
        "float32": (
            lambda w: (torch.ops.mkldnn._reorder_linear_weight(w, ONEDNN_BATCH_HINT), w.shape[0]),
            lambda x, p: onednn_linear(x, p[0], None, p[1]),
            4,
        ),
        "bfloat16": (lambda w: w.bfloat16(), lambda x, w: F.linear(x.bfloat16(), w), 2),
        "int8 fused": (int8, lambda x, p: fused(x, *p), 1),
        "int8 onednn": (int8, lambda x, p: _two_pass(x, *p), 1),
    }
    ops = torch.ops.shardserve_kernels
    if kernel:
        paths["int8 kernel"] = (int8, lambda x, p: ops.int8_linear(x, *p), 1)
    if kernel and kernel_isa() >= 2:
        paths["int8 blocks"] = (_int8_blocks, lambda x, p: ops.int8_blocks_linear(x, *p), 1)
        paths["nf4 kernel"] = (_nf4_blocks, lambda x, p: ops.nf4_blocks_linear(x, *p), 0.5)
    if kernel and expand.expand_available():
        paths["int8 expand"] = (int8, lambda x, p: expand.int8_matmul(x, *p), 1)
        paths["nf4 expand"] = (_nf4_blocks, lambda x, p: expand.nf4_blocks_matmul(x, *p), 0.5)
    return {name: path for name, path in paths.items() if rows <= MAX_ROWS.get(name, rows)}


def measure(shape: str, rows: int, total_bytes: int, passes: int = 3) -> dict[str, dict]:
    import torch

    from shards import kernels

    kernel = kernels.load()
    out: dict[str, dict] = {}
    for name, (n, k) in linear_shapes(shape).items():
        torch._dynamo.reset()  # one compiled `int8 fused` per shape, never over dynamo's limit
        paths = _paths(kernel, rows)
        x = torch.randn(rows, k)
        out[name] = {"shape": [n, k]}
        for path, (prepare, run, itemsize) in paths.items():
            count = max(2, int(total_bytes // (n * k * itemsize)))
            weights = [prepare(torch.randn(n, k) * 0.02) for _ in range(count)]
            with torch.inference_mode():
                run(x, weights[0])  # compiles, packs, warms
                best = float("inf")
                for _ in range(passes):
                    started = time.perf_counter()
                    for w in weights:
                        run(x, w)
                    best = min(best, (time.perf_counter() - started) / count)
            work = n * k * itemsize if rows <= GEMV_ROWS else 2 * n * k * rows
            out[name][path] = work / best / 1e9
            del weights
        log.info(
            "%s %s: %s", shape, name, {p: round(v, 1) for p, v in out[name].items() if p != "shape"}
        )
    return out


def _table(report: dict) -> str:
    lines = []
    for shape, rows in report["shapes"].items():
        paths = [p for p in next(iter(rows.values())) if p != "shape"]
        unit = "GB/s of weight bytes" if report["rows"] <= GEMV_ROWS else "GFLOP/s"
        lines.append(f"{shape}, {report['rows']} row(s): {unit}")
        lines.append(f"{'linear':10s} {'out x in':>13s}" + "".join(f" {p:>12s}" for p in paths))
        for name, r in rows.items():
            n, k = r["shape"]
            cells = "".join(f" {r[p]:12.1f}" for p in paths)
            lines.append(f"{name:10s} {f'{n}x{k}':>13s}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardserve bench-kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--shapes", default="smollm2-135m,llama-1b",
                   help=f"comma-separated, of {', '.join(SHAPES)}")  # fmt: skip
    p.add_argument("--rows", type=int, default=1, help="tokens per call (1 to 4096)")
    p.add_argument("--total-mib", type=int, default=512, help="weight bytes per shape and path")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown or not 1 <= args.rows <= 4096:
        p.error(f"unknown shapes {unknown}" if unknown else "--rows: 1 to 4096")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    report = {
        "rows": args.rows,
        "threads": torch.get_num_threads(),
        "shapes": {s: measure(s, args.rows, args.total_mib * 2**20) for s in shapes},
    }
    write_report(_table(report), report, args.json)
    return 0
