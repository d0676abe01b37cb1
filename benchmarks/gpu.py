"""`python -m benchmarks.gpu`: decode speed on one CUDA GPU per quantization mode, eager and
with CUDA graphs, against the memory-bandwidth roofline; the share of an eager decode step the
GPU spends waiting on the host; and (--kernels) each quantized matmul's GPU time per shape.

Without --model it builds a random-weight checkpoint shaped like SmolLM2-135M (the embedded
model) or, with --shape llama-1b, like Llama-3.2-1B: decode speed depends on shapes, not on
weight values.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import random
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks.common import write_report
from benchmarks.shapes import SHAPES as LAYOUTS
from layers.quant.dequant import _fp8_scaled_mm

log = logging.getLogger("shardserve.bench")

# benchmarks/shapes.py's layouts with each model's own vocabulary (Llama-3.2-1B's 128,256
# tokens): the GPU figures in BENCHMARKS.md were measured so.
SHAPES = {
    name: dict(LAYOUTS[name], vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    for name, vocab in (("smollm2-135m", 49152), ("llama-1b", 128256))
}


def build_random_checkpoint(folder: str, dtype: str = "bfloat16", shape: str = "smollm2-135m"):
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPES[shape]))
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    return folder


def gpu_engine(spec, max_num_seqs: int = 256, cuda_graphs: bool = False):
    """A shard in this process and the engine that drives it, with the server's scheduler (the
    prefix cache off: every timed prompt runs in full)."""
    from launcher.plan import config_with, router_settings
    from router.assembly import build_scheduler
    from router.engine.core import EngineCore
    from shards.worker import Worker

    worker = Worker(spec, cuda_graphs=cuda_graphs)
    info = worker.info()
    c = config_with(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        enable_prefix_caching=False,
    )
    max_len = info.max_model_len
    settings = router_settings(c, spec.model_path, "bench", (), spec.quantization, max_len)
    return worker, EngineCore(build_scheduler(settings, info, None), worker)


def add_greedy(engine, prompts: list[list[int]], max_tokens: int, tag: str) -> None:
    from router.params import GenerationParams
    from shards.wire import SamplingParams

    params = GenerationParams(
        max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0), ignore_eos=True
    )
    for i, p in enumerate(prompts):
        engine.add(f"{tag}-{i}", p, params)


def _decode(engine, prompts: list[list[int]], max_tokens: int) -> dict:
    """Prefill every prompt, then time the decode steps that follow until all finish."""
    from router.engine.core import StepTimes

    add_greedy(engine, prompts, max_tokens, f"b{len(prompts)}")
    started: set[int] = set()
    while len(started) < len(prompts):
        started.update(u.seq.seq_id for u in engine.step() if u.new_token_ids)
    engine.times = StepTimes()
    tokens = 0
    t = time.perf_counter()
    while engine.has_work():
        tokens += sum(len(u.new_token_ids) for u in engine.step())
    seconds = time.perf_counter() - t
    steps = engine.times.summary()
    return {
        "tok_s": tokens / seconds,
        "step_ms": 1e3 * seconds / max(engine.times.steps, 1),
        "forward_ms": steps["forward_ms"],
        "router_ms": steps["schedule_ms"] + steps["update_ms"],
    }


def _gpu_busy(engine, prompt: list[int], num_steps: int, trace_path: str | None) -> dict:
    """GPU time per decode step, from the profiler's kernel and copy records (one stream)."""
    from torch.profiler import ProfilerActivity, profile

    add_greedy(engine, [prompt], num_steps + 8, "prof")
    for _ in range(4):  # prefill and a few decodes outside the window
        engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(num_steps):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_work():
        engine.step()
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in device_events)
    if trace_path:
        with open(trace_path, "w") as f:
            f.write(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30))
    return {
        "gpu_ms_per_step": busy_us / 1e3 / num_steps,
        "kernels_per_step": len(device_events) / num_steps,
    }


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second: the practical HBM ceiling."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * 10 * src.numel() / (start.elapsed_time(end) / 1e3)


def _mode(args, model_path: str, mode: str, bandwidth: float, graphs: bool) -> dict:
    from launcher.plan import config_with, shard_spec

    c = config_with(
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_batched_tokens=max(args.batches) * args.prompt_len,
    )
    max_len = args.prompt_len + args.max_tokens + 64
    spec = shard_spec(c, model_path, mode, max_len, device="cuda", progress=False)
    worker, engine = gpu_engine(spec, max_num_seqs=max(args.batches), cuda_graphs=graphs)
    rng = random.Random(0)
    vocab = worker.cfg.vocab_size

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(n)]

    _decode(engine, prompts(1), 8)  # warm-up: cuBLAS handles, allocator, kernels' first use
    out: dict = {"weight_bytes": worker.weight_bytes, "batches": {}}
    # KV bytes a decode token reads per context token (every layer's K and V).
    kv_per_token = worker.kv_block_bytes / worker.block_size
    for b in args.batches:
        r = _decode(engine, prompts(b), args.max_tokens)
        mean_ctx = args.prompt_len + args.max_tokens / 2
        step_bytes = worker.weight_bytes + b * mean_ctx * kv_per_token
        r["roofline_tok_s"] = b * bandwidth / worker.weight_bytes
        r["roofline_kv_tok_s"] = b * bandwidth / step_bytes
        out["batches"][b] = r
        log.info("%s batch %d: %.0f tok/s (%.2f ms/step)", mode, b, r["tok_s"], r["step_ms"])
    tag = f"{mode}{'-graphs' if graphs else ''}"
    trace = f"{args.trace_dir}/kernels-{tag}.txt" if args.trace_dir else None
    out["profile"] = _gpu_busy(engine, prompts(1)[0], args.profile_steps, trace)
    single = out["batches"][args.batches[0]]["step_ms"]
    out["profile"]["host_share"] = 1 - out["profile"]["gpu_ms_per_step"] / single
    out["attention_backend"] = worker.attention_backend
    del worker, engine
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    p.add_argument("--model", default=None, help="model folder (default: a random one)")
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--modes", default="none,ifq,fp8", help="comma-separated quantization modes")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,16,64", help="comma-separated decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--profile-steps", type=int, default=20)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--trace-dir", default=None, help="write each mode's top kernels here")
    p.add_argument("--eager-only", action="store_true", help="skip the CUDA-graph runs")
    p.add_argument("--kernels", action="store_true", help="also time matmuls per shape")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA GPU")
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or build_random_checkpoint(tmp, args.dtype, args.shape)
        bandwidth = copy_bandwidth()
        modes = {}
        for m in args.modes.split(","):
            modes[m] = _mode(args, model_path, m, bandwidth, graphs=False)
            if not args.eager_only:
                modes[f"{m}+graphs"] = _mode(args, model_path, m, bandwidth, graphs=True)
    report = {
        "machine": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": args.model or f"random {args.shape}",
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "copy_bandwidth_GBs": bandwidth / 1e9,
        "modes": modes,
        "kernels": kernel_table() if args.kernels else None,
    }
    write_report(_table(report), report, args.json)
    return 0


def _table(r: dict) -> str:
    lines = [
        f"{r['machine']}, torch {r['torch']}, {r['model']}, {r['dtype']}, "
        f"copy bandwidth {r['copy_bandwidth_GBs']:.0f} GB/s",
        f"{'mode':12s} {'batch':>5s} {'tok/s':>9s} {'ms/step':>8s} {'roofline':>9s} "
        f"{'+KV':>9s} {'of roof':>7s}",
    ]
    for mode, m in r["modes"].items():
        for b, x in m["batches"].items():
            lines.append(
                f"{mode:12s} {b:>5} {x['tok_s']:9.0f} {x['step_ms']:8.2f} "
                f"{x['roofline_tok_s']:9.0f} {x['roofline_kv_tok_s']:9.0f} "
                f"{x['tok_s'] / x['roofline_kv_tok_s']:6.1%}"
            )
        prof = m.get("profile")
        if prof:
            lines.append(
                f"{mode}: {m['weight_bytes'] / 2**20:.0f} MiB weights, {m['attention_backend']}; "
                f"batch-1 step: GPU busy {prof['gpu_ms_per_step']:.2f} ms, "
                f"{prof['kernels_per_step']:.0f} kernels, host share {prof['host_share']:.0%}"
            )
    if r["kernels"]:
        names = list(KERNELS)
        lines.append("GPU us per matmul (graph replay): " + ", ".join(names))
        lines.append(f"{'out':>6s} {'in':>6s} {'rows':>4s} " + " ".join(f"{n:>9s}" for n in names))
        for row in r["kernels"]:
            times = " ".join(f"{row[n]:9.1f}" for n in names)
            lines.append(f"{row['out']:6d} {row['in']:6d} {row['rows']:4d} {times}")
    return "\n".join(lines)


# SmolLM2-135M's linears (qkv, o, gate_up, down, tied LM head), then Llama-3-8B's.
KERNEL_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]
KERNEL_SHAPES += [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
KERNELS = {  # name -> fn(x, weights of every form)
    "bf16": lambda x, t: F.linear(x, t["w"]),
    "ifq": lambda x, t: F.linear(x, t["q"].to(x.dtype)) * t["scale"],
    "int8pack": lambda x, t: torch._weight_int8pack_mm(x, t["q"], t["scale"]),
    "fp8 deq": lambda x, t: F.linear(x, t["w8"].to(x.dtype)) * t["scale"],
    "fp8 mm": lambda x, t: _fp8_scaled_mm(x, t["w8"], t["scale_row"]),
}


def _graph_us(fn, reps: int = 20) -> float:
    """GPU microseconds per call: `reps` calls recorded in a CUDA graph, replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (10 * reps)


def kernel_table(rows_list=(1, 4, 16, 64)) -> list[dict]:
    """bf16 F.linear against each quantized path on the same shape, in GPU time."""
    out = []
    for n, k in KERNEL_SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        t = {
            "w": w,
            "q": torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8),
            "scale": torch.rand(n, device="cuda", dtype=torch.bfloat16),
            "w8": w.to(torch.float8_e4m3fn),
            "scale_row": torch.rand(1, n, device="cuda"),
        }
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            row = {"out": n, "in": k, "rows": rows}
            for name, fn in KERNELS.items():
                row[name] = _graph_us(functools.partial(fn, x, t))
            out.append(row)
    return out


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    raise SystemExit(main())
