"""What a `shardserve bench` run reports: percentiles, the JSON-ready summary, its text form,
and the progress line. Plain arithmetic over measured results; no HTTP here."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    ttft: float | None = None  # seconds from sending to the first non-empty content chunk
    itls: list[float] = field(default_factory=list)  # seconds between content chunks
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None
    usage_reported: bool = False


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0–100) with linear interpolation between closest ranks, the
    definition numpy uses by default; None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ms_stats(seconds: Sequence[float]) -> dict:
    """p50/p90/p99/mean in milliseconds, None when nothing was measured."""
    out: dict = {f"p{q}": _ms(percentile(seconds, q)) for q in PERCENTILES}
    out["mean"] = _ms(sum(seconds) / len(seconds)) if seconds else None
    out["count"] = len(seconds)
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def summarize(
    config: dict, model: str, results: Sequence[RequestResult], errors: list[str], wall: float
) -> dict:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_counts = [r.prompt_tokens for r in ok if isinstance(r.prompt_tokens, int)]
    # Time per output token after the first: how fast a stream flows once it has started.
    tpots = [
        (r.e2e - r.ttft) / (r.output_tokens - 1)
        for r in ok
        if r.ttft is not None and r.output_tokens > 1
    ]
    return {
        "config": config,
        "model": model,
        "requests": {"total": len(results), "ok": len(ok), "failed": len(results) - len(ok)},
        "errors": errors,
        "wall_time_s": round(wall, 4),
        "output_tokens": output_tokens,
        "output_tokens_per_s": round(output_tokens / wall, 3) if wall > 0 else None,
        "requests_per_s": round(len(ok) / wall, 4) if wall > 0 else None,
        "prompt_tokens_mean": (
            round(sum(prompt_counts) / len(prompt_counts), 1) if prompt_counts else None
        ),
        "usage_reported": sum(r.usage_reported for r in ok),
        "short_outputs": sum(r.output_tokens < config["max_tokens"] for r in ok),
        "ttft_ms": _ms_stats([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": _ms_stats([t for r in ok for t in r.itls]),
        "tpot_ms": _ms_stats(tpots),
        "e2e_ms": _ms_stats([r.e2e for r in ok]),
    }


def config_dict(config) -> dict:
    out = asdict(config)
    out.pop("api_key", None)  # never write a secret into a results file
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_report(report: dict) -> str:
    cfg, req = report["config"], report["requests"]
    mode = (
        f"rag document ~{cfg['rag_document_tokens']} tokens"
        if cfg.get("rag_document_tokens")
        else f"prompt ~{cfg['prompt_tokens']} tokens"
    )
    lines = [
        f"shardserve bench  {cfg['url']}  model={report['model']}",
        f"  concurrency {cfg['concurrency']}, {req['total']} requests, {mode}, "
        f"max_tokens {cfg['max_tokens']}, ignore_eos {cfg['ignore_eos']}",
        f"requests        {req['ok']} ok, {req['failed']} failed",
        f"wall time       {report['wall_time_s']:.2f} s",
        f"output tokens   {report['output_tokens']}  ({_fmt(report['output_tokens_per_s'])} tok/s)",
        f"request rate    {report['requests_per_s'] or 0:.2f} req/s",
        f"prompt tokens   {_fmt(report['prompt_tokens_mean'])} mean (server's usage)",
    ]
    if req["ok"] and report["usage_reported"] < req["ok"]:
        lines.append("  note: some streams sent no usage; their chunks were counted as tokens")
    if cfg["ignore_eos"] and report["short_outputs"]:
        lines.append(
            f"  note: {report['short_outputs']} replies came back shorter than max_tokens despite "
            "ignore_eos (capped by the server, e.g. at the context length)"
        )
    lines.append(f"{'(ms)':8s}{'p50':>10s}{'p90':>10s}{'p99':>10s}{'mean':>10s}")
    for name, key in (
        ("TTFT", "ttft_ms"),
        ("ITL", "itl_ms"),
        ("TPOT", "tpot_ms"),
        ("E2E", "e2e_ms"),
    ):
        s = report[key]
        cells = "".join(f"{_fmt(s[k]):>10s}" for k in ("p50", "p90", "p99", "mean"))
        lines.append(f"{name:8s}{cells}")
    if report["errors"]:
        lines.append(f"first errors ({len(report['errors'])} shown):")
        lines += [f"  {e}" for e in report["errors"]]
    return "\n".join(lines)


class Progress:
    """One stderr line rewritten in place; at most ten updates a second."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.done = self.failed = 0
        self._shown_at = 0.0

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        now = time.monotonic()
        if self.enabled and (self.done == self.total or now - self._shown_at >= 0.1):
            self._shown_at = now
            sys.stderr.write(f"\rbench: {self.done}/{self.total} done, {self.failed} failed")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
