"""`shardserve bench-soak`: our server under a steady load for a long time (default 10 minutes
at concurrency 64 on the embedded model), with the memory of its processes sampled throughout.

Passes when no request failed and the resident memory of the server's processes (launcher,
router, shards) at the end is within --rss-tolerance of what it was after the first round
(warm: compiled, caches full). The load is `shardserve bench` rounds with fresh prompts each, so
the prefix cache keeps turning over.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time

from benchmarks.common import free_port, ours_cmd, start_server, stop_server, write_report
from benchmarks.shapes import add_model_args, model_folder
from clients.bench import BenchConfig, run_bench

log = logging.getLogger("shardserve.bench")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in os.listdir(f"/proc/{p}/task") if os.path.isdir(f"/proc/{p}/task") else []:
            try:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
    return out


def process_rss(pid: int) -> dict[str, int]:
    """Resident bytes of `pid` and every process below it, by process (name and pid)."""
    out = {}
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                rss = int(f.read().split()[1]) * PAGE
            with open(f"/proc/{p}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # gone between listing and reading
        module = next((a.decode() for a in argv if a.startswith((b"shards.", b"router."))), None)
        out[f"{module or 'launcher'} ({p})"] = rss
    return out


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and every process below it."""
    return sum(process_rss(pid).values())


class _Sampler(threading.Thread):
    def __init__(self, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()
        self.started_at = time.monotonic()

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.samples.append((time.monotonic() - self.started_at, tree_rss(self.pid)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardserve bench-soak", description=__doc__)
    add_model_args(p)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests-per-round", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--quantization", default="none")
    p.add_argument("--rss-tolerance", type=float, default=0.05)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.model = model_folder(args)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(ours_cmd(args.model, port, args.quantization, "continuous"), url, "/health")
    sampler = _Sampler(proc.pid, every=5.0)
    rounds, failed, finished, tokens = [], 0, 0, 0
    try:
        sampler.start()
        end = time.monotonic() + args.minutes * 60
        while time.monotonic() < end:
            cfg = BenchConfig(
                url=url,
                concurrency=args.concurrency,
                requests=args.requests_per_round,
                max_tokens=args.max_tokens,
                prompt_tokens=args.prompt_tokens,
                seed=len(rounds),  # fresh prompts every round
                progress=False,
            )
            r = asyncio.run(run_bench(cfg))
            by_process = process_rss(proc.pid)
            rss = sum(by_process.values())
            rounds.append({"round": len(rounds), "rss_bytes": rss, "by_process": by_process})
            failed += r["requests"]["failed"]
            finished += r["requests"]["ok"]
            tokens += r["output_tokens"]
            log.info(
                "round %d: %d requests (%d failed), %.1f output tok/s, server RSS %.0f MiB (%s)",
                len(rounds),
                r["requests"]["total"],
                r["requests"]["failed"],
                r["output_tokens_per_s"],
                rss / 2**20,
                ", ".join(f"{k} {v / 2**20:.0f}" for k, v in by_process.items()),
            )
    finally:
        sampler.done.set()
        stop_server(proc)
    warm = rounds[0]["rss_bytes"]
    last = rounds[-1]["rss_bytes"]
    peak = max(s for _, s in sampler.samples) if sampler.samples else last
    growth = last / warm - 1
    ok = failed == 0 and growth <= args.rss_tolerance
    report = {
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "rounds": len(rounds),
        "completed": finished,
        "failed": failed,
        "output_tokens": tokens,
        "rss_after_first_round_bytes": warm,
        "rss_end_bytes": last,
        "rss_peak_bytes": peak,
        "rss_growth": growth,
        "rss_samples": sampler.samples,
        "passed": ok,
    }
    text = (
        f"soak: {len(rounds)} rounds over {args.minutes:g} min at concurrency "
        f"{args.concurrency}: {finished} requests completed, {failed} failed, "
        f"{tokens} output tokens\n"
        f"server RSS: after round 1 {warm / 2**20:.0f} MiB, end {last / 2**20:.0f} MiB "
        f"({growth * 100:+.1f} %), peak {peak / 2**20:.0f} MiB -> "
        f"{'PASS' if ok else 'FAIL'} (tolerance {args.rss_tolerance * 100:g} %, no failures)"
    )
    write_report(text, report, args.json)
    return 0 if ok else 1
