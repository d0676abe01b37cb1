"""`shardserve bench-kernels`: how fast each path a decode step can take streams its weights,
per linear shape of a model, in one run: GB/s of weight bytes for one token (or `--rows`).

    float32     oneDNN's packed linear, as `none` serves float32 on CPU
    bfloat16    F.linear on bfloat16 weights
    int8 fused  the compiled multiply-and-sum over int8 weights (`fused_gemv`, float activations)
    int8 onednn the two-pass int8 rounding through torch._int_mm (oneDNN's int8 GEMM)
    int8 kernel the hand-written GEMV, `shardserve_kernels::int8_linear` (shards/kernels.py)

Each path runs over enough distinct weights of a shape (`--total-mib`) that they come from
memory, not from cache, as a real step's do; the best of a few passes counts.
"""

from __future__ import annotations

import argparse
import logging
import time

from launcher.cli import write_report
from launcher.shapes import SHAPES, VOCAB

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


def _paths(kernel: bool) -> dict:
    """name -> (prepare a float weight, run one input), with weight bytes per element."""
    import torch
    import torch.nn.functional as F

    from layers.quant.base import ONEDNN_BATCH_HINT, fused_gemv, onednn_linear
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
    if kernel:
        op = torch.ops.shardserve_kernels.int8_linear
        paths["int8 kernel"] = (int8, lambda x, p: op(x, *p), 1)
    return paths


def measure(shape: str, rows: int, total_bytes: int, passes: int = 3) -> dict[str, dict]:
    import torch

    from shards import kernels

    kernel = kernels.load()
    out: dict[str, dict] = {}
    for name, (n, k) in linear_shapes(shape).items():
        torch._dynamo.reset()  # one compiled `int8 fused` per shape, never over dynamo's limit
        paths = _paths(kernel)
        x = torch.randn(rows, k)
        out[name] = {"shape": [n, k]}
        for path, (prepare, run, itemsize) in paths.items():
            count = max(2, total_bytes // (n * k * itemsize))
            weights = [prepare(torch.randn(n, k) * 0.02) for _ in range(count)]
            with torch.inference_mode():
                run(x, weights[0])  # compiles, packs, warms
                best = float("inf")
                for _ in range(passes):
                    started = time.perf_counter()
                    for w in weights:
                        run(x, w)
                    best = min(best, (time.perf_counter() - started) / count)
            out[name][path] = n * k * itemsize / best / 1e9
            del weights
        log.info(
            "%s %s: %s", shape, name, {p: round(v, 1) for p, v in out[name].items() if p != "shape"}
        )
    return out


def _table(report: dict) -> str:
    lines = []
    for shape, rows in report["shapes"].items():
        paths = [p for p in next(iter(rows.values())) if p != "shape"]
        lines.append(f"{shape}, {report['rows']} row(s): GB/s of weight bytes")
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
    p.add_argument("--rows", type=int, default=1, help="tokens per call (at most 8)")
    p.add_argument("--total-mib", type=int, default=512, help="weight bytes per shape and path")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown or not 1 <= args.rows <= 8:
        p.error(f"unknown shapes {unknown}" if unknown else "--rows: 1 to 8")
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
