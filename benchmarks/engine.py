"""`shardserve bench-engine`: the offline engine against transformers `generate`, in one run.

Measures on the same model, greedy, same prompts: single-stream decode, a batch of prompts,
and prefill of a long prompt; prints ratios and our step-time breakdown.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
from typing import NamedTuple

from benchmarks.common import write_report
from benchmarks.shapes import add_model_args, model_folder

log = logging.getLogger("shardserve.bench")

TOPICS = [
    "dragons",
    "the ocean",
    "a lighthouse keeper",
    "volcanoes",
    "a chess game",
    "the moon",
    "a lost key",
    "autumn leaves",
    "a robot chef",
    "ancient Rome",
    "a mountain village",
    "the first snow",
    "a jazz band",
    "deep space",
    "a library at night",
    "a desert caravan",
]


def _prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msg = [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}]
        ids = tokenizer.apply_chat_template(msg, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def _long_prompt(tokenizer, n_tokens: int) -> list[int]:
    text = " ".join(
        f"Paragraph {i}: the quick brown fox jumps over the lazy dog near river {i}."
        for i in range(n_tokens)
    )
    return tokenizer.encode(text)[:n_tokens]


class Variant(NamedTuple):
    """What one of our columns runs."""

    quantization: str
    compiled: bool  # compiled decode steps
    kernels: bool = True  # the hand-written CPU kernels
    dtype: str | None = None  # None: the server's default for this CPU and mode


VARIANTS = {
    "eager": Variant("none", False, dtype="float32"),
    "compiled": Variant("none", True, dtype="float32"),
    "compiled-bf16": Variant("none", True, dtype="bfloat16"),
    "default": Variant("none", True),  # what `shardserve serve` picks with no flags
    "compiled-ifq": Variant("ifq", True),
    "compiled-ifq-torch": Variant("ifq", True, kernels=False),  # torch's own int8 paths
    "compiled-nf4": Variant("ifq_nf4", True),
}
DEFAULT_VARIANTS = ("eager", "compiled", "compiled-ifq")


def _ours(args, variants: list[str], prompts, long_prompt) -> dict[str, dict]:
    """Every variant loaded at once and measured in turns, `args.rounds` times each (medians):
    the shared machine's speed drifts over minutes, so alternating keeps the ratios fair."""
    from launcher.llm import LLM
    from router.params import GenerationParams
    from shards.wire import SamplingParams

    greedy = SamplingParams(temperature=0.0)
    params = GenerationParams(max_tokens=args.max_tokens, sampling=greedy, ignore_eos=True)
    cold = GenerationParams(max_tokens=1, sampling=greedy)
    llms = {}
    for v in variants:
        variant = VARIANTS[v]
        llms[v] = LLM(
            args.model,
            num_threads=args.threads,
            max_model_len=4096,
            kv_cache_memory=512 * 2**20,
            quantization=variant.quantization,
            cpu_compile=variant.compiled,
            cpu_kernels=variant.kernels,
            dtype=variant.dtype,
        )
        llms[v].generate([prompts[0]], GenerationParams(max_tokens=4, sampling=greedy))
        llms[v].scheduler.allocator.enable_prefix_caching = False  # measure prefill itself
    runs = {v: {"single": [], "batch": [], "prefill": []} for v in variants}
    steps = {v: {} for v in variants}

    def timed(llm, batch, p) -> float:
        llm.engine.times = type(llm.engine.times)()
        t = time.perf_counter()
        llm.generate(batch, p)
        return time.perf_counter() - t

    for r in range(args.rounds):
        for v, llm in llms.items():
            runs[v]["single"].append(args.max_tokens / timed(llm, [prompts[0]], params))
            steps[v]["single_steps"] = llm.engine.times.summary()
            runs[v]["batch"].append(len(prompts) * args.max_tokens / timed(llm, prompts, params))
            steps[v]["batch_steps"] = llm.engine.times.summary()
            runs[v]["prefill"].append(len(long_prompt) / timed(llm, [long_prompt], cold))
            log.info(
                "round %d/%d, %s: single %.1f, %d prompts %.1f, prefill %.1f tok/s",
                r + 1,
                args.rounds,
                v,
                runs[v]["single"][-1],
                len(prompts),
                runs[v]["batch"][-1],
                runs[v]["prefill"][-1],
            )
    out = {}
    for v, llm in llms.items():
        out[v] = {f"{k}_tok_s": statistics.median(xs) for k, xs in runs[v].items()}
        out[v].update(steps[v], model_path=llm.model_path)
        llm.close()
    return out


def _transformers(args, model_path, prompts, long_prompt) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    out: dict = {}

    def generate(batch: list[list[int]], n: int) -> float:
        width = max(len(p) for p in batch)
        pad = model.generation_config.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        t = time.perf_counter()
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=pad,
        )
        return time.perf_counter() - t

    with torch.inference_mode():
        generate([prompts[0]], 4)
        out["single_tok_s"] = args.max_tokens / generate([prompts[0]], args.max_tokens)
        log.info("transformers single stream: %.1f tok/s", out["single_tok_s"])
        out["batch_tok_s"] = len(prompts) * args.max_tokens / generate(prompts, args.max_tokens)
        log.info("transformers %d prompts: %.1f tok/s", len(prompts), out["batch_tok_s"])
        t = time.perf_counter()
        model(torch.tensor([long_prompt]))
        out["prefill_tok_s"] = len(long_prompt) / (time.perf_counter() - t)
        log.info("transformers prefill: %.1f tok/s", out["prefill_tok_s"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardserve bench-engine", description=__doc__)
    add_model_args(p)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prefill-tokens", type=int, default=1200)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--rounds", type=int, default=3, help="turns per variant (medians reported)")
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"our configurations to run, comma-separated (of {', '.join(VARIANTS)})",
    )
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    model_path = args.model = model_folder(args)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = _prompts(tokenizer, args.batch)
    long_prompt = _long_prompt(tokenizer, args.prefill_tokens)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")
    ours = _ours(args, variants, prompts, long_prompt)
    ref = None if args.skip_transformers else _transformers(args, model_path, prompts, long_prompt)
    report = {
        "machine": f"{platform.machine()}, {_cpus()} CPUs",
        "model": model_path,
        "max_tokens": args.max_tokens,
        "batch": args.batch,
        "ours": ours,
        "transformers": ref,
    }
    write_report(_table(report), report, args.json)
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _table(r: dict) -> str:
    ours, ref = r["ours"], r["transformers"]
    rows = [
        ("single-stream decode", "single_tok_s"),
        (f"{r['batch']} prompts", "batch_tok_s"),
        ("prefill", "prefill_tok_s"),
    ]
    head = "".join(f" {v:>20s}" for v in ours)
    lines = [f"tok/s (x transformers)   {head} {'transformers' if ref else '':>13s}"]
    for name, key in rows:
        if ref:
            cells = "".join(f" {o[key]:11.1f} ({o[key] / ref[key]:5.2f}x)" for o in ours.values())
            lines.append(f"{name:24s}{cells} {ref[key]:13.1f}")
        else:
            lines.append(f"{name:24s}" + "".join(f" {o[key]:20.1f}" for o in ours.values()))
    first = next(iter(ours))
    if len(ours) > 1:  # every variant against the first, in the same run
        for name, key in rows:
            base = ours[first][key]
            cells = "".join(f" {o[key] / base:19.2f}x" for o in ours.values())
            lines.append(f"{name + ' x ' + first:24s}{cells}")
    for variant, o in ours.items():
        for label, key in (("single", "single_steps"), ("batch", "batch_steps")):
            s = o[key]
            lines.append(
                f"step time, {variant} ({label}): forward+sample {s['forward_ms']:.2f} ms, "
                f"schedule {s['schedule_ms']:.3f} ms, update {s['update_ms']:.3f} ms, "
                f"{s['tokens_per_step']:.1f} tokens/step"
            )
    return "\n".join(lines)
