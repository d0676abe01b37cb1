"""`shardserve bench-serve`: our server against `transformers serve --continuous-batching` on the
same model, one after the other in one run, with the same load from `shardserve bench`.

Needs `pip install 'transformers[serving]'` for the baseline (`make bench-serve` does it).
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardserve bench-serve", description=__doc__)
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--long-prompt-tokens", type=int, default=1200)
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from launcher.embedded import ensure_embedded_model

    model = args.model or str(ensure_embedded_model())
    report: dict = {"model": model, "cpus": len(os.sched_getaffinity(0))}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    ours = _start(
        [
            sys.executable,
            "-m",
            "launcher",
            "serve",
            "--model-path",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        url,
        "/health",
    )
    try:
        report["ours"] = _run_all(url, _loads(args))
        report["ours_steps"] = httpx.get(url + "/stats", timeout=10).json()["steps"]
    finally:
        _stop(ours)
    if not args.skip_transformers:
        exe = shutil.which("transformers")
        if exe is None:
            raise SystemExit("transformers CLI not found: pip install 'transformers[serving]'")
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        theirs = _start(
            [
                exe,
                "serve",
                "--continuous-batching",
                "--dtype",
                "float32",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                model,
            ],
            url,
            "/health",
        )
        try:
            report["transformers"] = _run_all(url, _loads(args))
        finally:
            _stop(theirs)
    write_report(_table(report), report, args.json)
    failed = sum(r["requests"]["failed"] for r in report["ours"].values())
    return 1 if failed else 0


def _table(r: dict) -> str:
    lines = [
        f"{'load':28s} {'ours tok/s':>11s} {'hf tok/s':>9s} {'ratio':>6s} "
        f"{'ours TTFT p50':>14s} {'hf TTFT p50':>12s} {'failed':>7s}"
    ]
    for name, ours in r["ours"].items():
        theirs = (r.get("transformers") or {}).get(name)
        a = ours["output_tokens_per_s"]
        b = (theirs["output_tokens_per_s"] if theirs else None) or float("nan")
        ta = ours["ttft_ms"]["p50"] or float("nan")
        tb = (theirs["ttft_ms"]["p50"] if theirs else None) or float("nan")
        failed = ours["requests"]["failed"]
        ratio = a / b if b else float("nan")
        lines.append(
            f"{name:28s} {a:11.1f} {b:9.1f} {ratio:5.2f}x {ta:12.0f}ms {tb:10.0f}ms {failed:7d}"
        )
    s = r["ours_steps"]
    lines.append(
        f"ours per step: forward {s['forward_ms']:.1f} ms, router "
        f"{100 * s['router_share']:.1f}% of step time"
    )
    return "\n".join(lines)
