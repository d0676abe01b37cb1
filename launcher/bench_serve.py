"""`shardserve bench-serve`: our server (once per quantization mode asked for) against
`transformers serve --continuous-batching` on the same model and, given its binary, llama.cpp's
`llama-server` on the embedded GGUF, one after the other in one run, with the same load from
`shardserve bench`.

Needs `pip install 'transformers[serving]'` for that baseline (`make bench-serve` does it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx

from clients.bench import BenchConfig, run_bench
from launcher.cli import write_report
from launcher.shapes import add_model_args, model_folder

log = logging.getLogger("shardserve.bench")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], url: str, health: str, deadline: float = 600) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url + health, timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{' '.join(cmd)} was not ready in {deadline}s")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _loads(args) -> list[tuple[str, BenchConfig]]:
    # Greedy, no ignore_eos (the baseline rejects it): both servers generate the same tokens.
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
                    ignore_eos=False,
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
                ignore_eos=False,
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


def _ours_cmd(model: str, port: int, quantization: str, scheduler: str) -> list[str]:
    return [
        sys.executable, "-m", "launcher", "serve", "--model-path", model,
        "--quantization", quantization, "--scheduler", scheduler,
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


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


def _llama_cpp_cmd(server: str, gguf: str, port: int, slots: int, threads: int) -> list[str]:
    # One slot per concurrent request; the context is shared by the slots.
    return [
        server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
        "-np", str(slots), "-c", str(slots * 2048), "-t", str(threads), "--no-webui",
    ]  # fmt: skip


def _serve_and_load(name: str, cmd: list[str], port: int, loads, report: dict) -> None:
    url = f"http://127.0.0.1:{port}"
    log.info("starting %s", name)
    proc = _start(cmd, url, "/health")
    try:
        report["servers"][name] = _run_all(url, loads)
        if name.startswith("ours"):
            report["steps"][name] = httpx.get(url + "/stats", timeout=10).json()["steps"]
    finally:
        _stop(proc)


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
    p.add_argument("--gguf", default=None, help="GGUF for llama-server (default: the embedded one)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from launcher.embedded import gguf_path

    model = model_folder(args)
    report: dict = {"model": model, "cpus": len(os.sched_getaffinity(0)), "servers": {}}
    report["steps"] = {}
    loads = _loads(args)
    exe = None if args.skip_transformers else _transformers_exe()  # before any long run
    for mode in args.quantization:
        for scheduler in args.scheduler:
            port = _free_port()
            name = f"ours {mode}" + ("" if scheduler == "continuous" else f" {scheduler}")
            cmd = _ours_cmd(model, port, mode, scheduler)
            _serve_and_load(name, cmd, port, loads, report)
    if not args.skip_transformers:
        port = _free_port()
        _serve_and_load("transformers", _transformers_cmd(exe, model, port), port, loads, report)
    if args.llama_server:
        port = _free_port()
        gguf = args.gguf or str(gguf_path())
        cmd = _llama_cpp_cmd(args.llama_server, gguf, port, max(args.concurrency), report["cpus"])
        _serve_and_load("llama.cpp", cmd, port, loads, report)
    write_report(_table(report), report, args.json)
    failed = sum(
        r["requests"]["failed"]
        for name, results in report["servers"].items()
        if name.startswith("ours")
        for r in results.values()
    )
    return 1 if failed else 0


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
    for n, s in r["steps"].items():
        lines.append(
            f"{n} per step: forward {s['forward_ms']:.1f} ms, router "
            f"{100 * s['router_share']:.1f}% of step time"
        )
    return "\n".join(lines)
