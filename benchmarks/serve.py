"""`shardserve bench-serve`: our server (once per quantization mode asked for) against
`transformers serve --continuous-batching` on the same model and, given its binary, llama.cpp's
`llama-server` on a GGUF of the same weights (the embedded model's own Q4_1 file, else the
checkpoint converted by benchmarks/llama_cpp.py), one after the other in one run, with the same
load from `shardserve bench`. `--engine` adds the offline engine on the single-stream load's
prompts, to show what the server path costs per token.

Needs `pip install 'transformers[serving]'` for that baseline (`make bench-serve` does it).
Random-weight shapes (`--shape`) make garbage text, so their loads ignore EOS.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import shutil
import sys
import time

import httpx

from benchmarks.common import free_port, ours_cmd, start_server, stop_server, write_report
from benchmarks.llama_cpp import GGUF_TYPES, ensure_gguf, server_cmd
from benchmarks.shapes import add_model_args, model_folder
from clients.bench import BenchConfig, run_bench

log = logging.getLogger("shardserve.bench")


def _loads(args) -> list[tuple[str, BenchConfig]]:
    # Greedy and, on a real model, no ignore_eos (transformers rejects it): every server
    # generates the same tokens.
    ignore_eos = bool(args.ignore_eos or args.shape)
    out = []
    for c in args.concurrency:
        n = max(args.min_requests, 2 * c)
        out.append(
            (
                f"concurrency {c}",
                BenchConfig(
                    concurrency=c,
                    requests=n,
                    max_tokens=args.max_tokens,
                    prompt_tokens=args.prompt_tokens,
                    progress=False,
                    ignore_eos=ignore_eos,
                ),
            )
        )
    out.append(
        (
            f"{args.long_prompt_tokens}-token prompt TTFT",
            BenchConfig(
                concurrency=1,
                requests=3,
                max_tokens=8,
                prompt_tokens=args.long_prompt_tokens,
                progress=False,
                seed=1,
                ignore_eos=ignore_eos,
            ),
        )
    )
    return out


def _run_all(url: str, loads) -> dict:
    results = {}
    for name, cfg in loads:
        log.info("%s: %s", url, name)
        results[name] = asyncio.run(run_bench(dataclasses.replace(cfg, url=url)))
    return results


def _transformers_exe() -> str:
    # Next to this interpreter first: a venv's scripts are not always on PATH.
    beside = os.path.join(os.path.dirname(sys.executable), "transformers")
    exe = beside if os.access(beside, os.X_OK) else shutil.which("transformers")
    if exe is None:
        raise SystemExit("transformers CLI not found: pip install 'transformers[serving]'")
    return exe


def _transformers_cmd(exe: str, model: str, port: int) -> list[str]:
    return [
        exe, "serve", "--continuous-batching", "--dtype", "float32",
        "--host", "127.0.0.1", "--port", str(port), model,
    ]  # fmt: skip


def engine_single_stream(model: str, mode: str, loads) -> dict:
    """The offline engine on the single-stream load's chats, one after another, as the server
    ran them: output tok/s over the whole run (prefill included)."""
    from clients.workload import build_prompts
    from launcher.llm import LLM
    from router.params import GenerationParams
    from shards.wire import SamplingParams

    cfg = next(c for name, c in loads if name == "concurrency 1")
    texts = build_prompts(cfg.requests, cfg.prompt_tokens, cfg.rag_document_tokens, cfg.seed)
    params = GenerationParams(
        max_tokens=cfg.max_tokens,
        sampling=SamplingParams(temperature=0.0),
        ignore_eos=cfg.ignore_eos,
    )
    with LLM(model, quantization=mode) as llm:
        chats = [llm.encode_chat([{"role": "user", "content": t}]) for t in texts]
        # warm, as the server is by the loads before: the template's shared prefix cached, not
        # a timed prompt
        llm.generate([llm.encode_chat([{"role": "user", "content": "Hello."}])], params)
        start = time.perf_counter()
        done = [llm.generate([chat], params)[0] for chat in chats]
        elapsed = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in done)
    log.info("offline engine, %s: %d tokens in %.1f s", mode, tokens, elapsed)
    return {"output_tokens": tokens, "output_tokens_per_s": tokens / elapsed}


def _serve_and_load(name: str, cmd: list[str], port: int, loads, report: dict) -> None:
    url = f"http://127.0.0.1:{port}"
    log.info("starting %s", name)
    proc = start_server(cmd, url, "/health")
    try:
        report["servers"][name] = _run_all(url, loads)
        if name.startswith("ours"):
            report["steps"][name] = httpx.get(url + "/stats", timeout=10).json()["steps"]
    finally:
        stop_server(proc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardserve bench-serve", description=__doc__)
    add_model_args(p)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--long-prompt-tokens", type=int, default=1200)
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument(
        "--quantization", nargs="+", default=["none"], help="our server once per QUANTIZATION"
    )
    p.add_argument(
        "--scheduler",
        nargs="+",
        default=["continuous"],
        choices=["continuous", "dynamic-batching"],
        help="our server once per scheduler (and QUANTIZATION)",
    )
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument(
        "--llama-server",
        default=None,
        help="also measure llama.cpp's llama-server binary (built by you) on --gguf",
    )
    p.add_argument(
        "--gguf",
        default=None,
        help="GGUF for llama-server (default: the embedded model's own Q4_1 file, else the "
        "model converted to --gguf-type)",
    )
    p.add_argument(
        "--gguf-type",
        default=None,
        choices=GGUF_TYPES,
        help="the GGUF to convert the model to (default: q8_0; the embedded model: its own q4_1)",
    )
    p.add_argument("--ignore-eos", action="store_true", help="exact output lengths (--shape: on)")
    p.add_argument(
        "--engine",
        action="store_true",
        help="also time the offline engine, per quantization mode, on the single-stream prompts",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.engine and 1 not in args.concurrency:
        p.error("--engine compares with the single-stream load: include 1 in --concurrency")
    model = model_folder(args)
    embedded = not (args.model or args.shape)
    report: dict = {"model": model, "cpus": len(os.sched_getaffinity(0)), "servers": {}}
    report["steps"] = {}
    report["engine"] = {}
    loads = _loads(args)
    exe = None if args.skip_transformers else _transformers_exe()  # before any long run
    for mode in args.quantization:
        for scheduler in args.scheduler:
            port = free_port()
            name = f"ours {mode}" + ("" if scheduler == "continuous" else f" {scheduler}")
            cmd = ours_cmd(model, port, mode, scheduler)
            _serve_and_load(name, cmd, port, loads, report)
        if args.engine:
            report["engine"][f"ours {mode}"] = engine_single_stream(model, mode, loads)
    if not args.skip_transformers:
        port = free_port()
        _serve_and_load("transformers", _transformers_cmd(exe, model, port), port, loads, report)
    if args.llama_server:
        port = free_port()
        gguf = args.gguf or _gguf_for(model, embedded, args)
        report["gguf"] = gguf
        cmd = server_cmd(args.llama_server, gguf, port, max(args.concurrency), report["cpus"])
        _serve_and_load("llama.cpp", cmd, port, loads, report)
    write_report(_table(report), report, args.json)
    failed = sum(
        r["requests"]["failed"]
        for name, results in report["servers"].items()
        if name.startswith("ours")
        for r in results.values()
    )
    return 1 if failed else 0


def _gguf_for(model: str, embedded: bool, args) -> str:
    if embedded and args.gguf_type in (None, "q4_1"):  # the file it was converted from
        from launcher.embedded import gguf_path

        return str(gguf_path())
    return str(ensure_gguf(model, args.gguf_type or "q8_0", args.llama_server))


def _table(r: dict) -> str:
    servers = r["servers"]
    names = list(servers)
    baselines = [n for n in names if not n.startswith("ours")]
    head = f"{'load':28s}" + "".join(f" {n + ' tok/s':>18s}" for n in names)
    lines = [head + "".join(f" {'ours x ' + b:>16s}" for b in baselines)]
    for load in servers[names[0]]:
        rate = {n: servers[n][load]["output_tokens_per_s"] or float("nan") for n in names}
        row = f"{load:28s}" + "".join(f" {rate[n]:18.1f}" for n in names)
        for b in baselines:  # our best configuration against each baseline
            best = max(rate[n] for n in names if n.startswith("ours"))
            row += f" {best / rate[b]:15.2f}x"
        lines.append(row)
    lines.append("TTFT p50 (ms) / ITL p50 (ms) / failed:")
    for load in servers[names[0]]:
        cells = []
        for n in names:
            res = servers[n][load]
            ttft = res["ttft_ms"]["p50"] or float("nan")
            itl = res["itl_ms"]["p50"] or float("nan")
            cells.append(f"{n} {ttft:.0f}/{itl:.0f}/{res['requests']['failed']}")
        lines.append(f"  {load:26s} " + "; ".join(cells))
    for n, e in r["engine"].items():
        served = servers[n]["concurrency 1"]["output_tokens_per_s"]
        lines.append(
            f"{n} single stream: server {served:.1f} tok/s, offline engine "
            f"{e['output_tokens_per_s']:.1f} tok/s on the same prompts: "
            f"server/engine {served / e['output_tokens_per_s']:.2f}x"
        )
    for n, s in r["steps"].items():
        lines.append(
            f"{n} per step: forward {s['forward_ms']:.1f} ms, router "
            f"{100 * s['router_share']:.1f}% of step time"
        )
    return "\n".join(lines)
