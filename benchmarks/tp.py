"""`shardserve bench-tp`: what tensor parallelism costs per step on CPU over gloo.

Builds a random mid-sized Llama, then in one run: decode step time at TP=1 (all cores, one
process) and TP=2 (one process per rank, the cores split between them), single stream and a
batch; and the cost of the collectives themselves (an all-reduce of one step's activations, the
plan broadcast), timed in a two-rank gloo group.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time

from benchmarks.common import write_report

log = logging.getLogger("shardserve.bench")


def _build(folder: str, args) -> None:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        # a quarter of the heads (GQA) where that divides them; one shared head at worst
        num_key_value_heads=math.gcd(args.hidden // 64, max(2, args.hidden // 256)),
        vocab_size=args.vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)


def _decode(folder: str, tp: int, args) -> dict:
    from launcher.llm import LLM
    from router.params import GenerationParams
    from shards.wire import SamplingParams

    greedy = SamplingParams(temperature=0.0)
    params = GenerationParams(max_tokens=args.max_tokens, sampling=greedy, ignore_eos=True)
    out = {}
    with LLM(folder, tensor_parallel_size=tp, load_tokenizer=False, kv_cache_memory=2**30) as llm:
        llm.generate([[5, 6, 7]], GenerationParams(max_tokens=4, sampling=greedy))  # warm-up
        for name, n in (("single", 1), (f"batch {args.batch}", args.batch)):
            prompts = [[3 + (i * 7 + j) % 500 for j in range(16)] for i in range(n)]
            llm.engine.times = type(llm.engine.times)()
            t = time.perf_counter()
            llm.generate(prompts, params)
            elapsed = time.perf_counter() - t
            steps = llm.engine.times.summary()
            out[name] = {
                "tok_s": n * args.max_tokens / elapsed,
                "step_ms": steps["shard_ms"],
                "forward_ms": steps["forward_ms"],
            }
            log.info("TP=%d %s: %.2f ms per step", tp, name, steps["shard_ms"])
    return out


def _collective_rank(rank: int, port: int, hidden: int, batch: int, n: int, out: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from layers.parallel import ParallelContext
    from shards.distributed import GLOO_GATHER_REDUCE_MAX, PlanChannel

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    results = {}
    pctx = ParallelContext(rank, 2, gather_reduce_max=GLOO_GATHER_REDUCE_MAX)
    for rows in (1, batch):
        x = torch.randn(rows, hidden)
        for name, reduce in (("gloo all_reduce", dist.all_reduce), ("ours", pctx.all_reduce)):
            for _ in range(20):
                reduce(x)
            dist.barrier()
            t = time.perf_counter()
            for _ in range(n):
                reduce(x)
            results[f"{name} {rows}x{hidden} us"] = (time.perf_counter() - t) / n * 1e6
    channel = PlanChannel(pctx)
    plan = {"type": "plan", "plan": {"step_id": 1, "seqs": [[1, [42], 100, list(range(8))]] * 16}}
    dist.barrier()
    t = time.perf_counter()
    for _ in range(n):
        if rank == 0:
            channel.send(plan)
        else:
            channel.recv()
    results["plan broadcast us"] = (time.perf_counter() - t) / n * 1e6
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def _collectives(args) -> dict:
    import torch.multiprocessing as mp

    from launcher.groups import free_port

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "collectives.json")
        mp.start_processes(
            _collective_rank,
            args=(free_port(), args.hidden, args.batch, 500, out),
            nprocs=2,
            start_method="spawn",
        )
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardserve bench-tp", description=__doc__)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.hidden % 128:
        p.error(f"--hidden {args.hidden}: a multiple of 128 (heads of 64, an even number of them)")
    with tempfile.TemporaryDirectory(prefix="shardserve-bench-tp-") as folder:
        log.info("building a random Llama: hidden %d, %d layers", args.hidden, args.layers)
        _build(folder, args)
        report = {"model": vars(args), "tp1": _decode(folder, 1, args)}
        report["tp2"] = _decode(folder, 2, args)
    report["collectives"] = _collectives(args)
    per_step = 2 * args.layers + 2  # o_proj + down_proj per layer, embedding, LM head gather
    c = report["collectives"]
    lines = [f"{'':16s} {'TP=1 ms/step':>13s} {'TP=2 ms/step':>13s} {'TP=2 - TP=1':>12s}"]
    for name in report["tp1"]:
        a, b = report["tp1"][name]["step_ms"], report["tp2"][name]["step_ms"]
        lines.append(f"{name:16s} {a:13.2f} {b:13.2f} {b - a:+11.2f}")
    for k, v in c.items():
        lines.append(f"{k:36s} {v:9.1f}")
    one = c[f"ours 1x{args.hidden} us"]
    lines.append(
        f"collectives per decode step: {per_step} all-reduces + 1 plan broadcast "
        f"≈ {per_step * one + c['plan broadcast us']:.0f} us (single stream)"
    )
    write_report("\n".join(lines), report, args.json)
    return 0
