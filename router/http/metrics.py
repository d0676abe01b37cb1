"""Prometheus metrics for `/metrics`, under `shardserve:`, named as vLLM names them where it has
the same figure (its `vllm:time_to_first_token_seconds` is `shardserve:time_to_first_token_seconds`
here).

Events (a request finishing, a step ending) are counted as they happen by the engine of each
worker group through its `GroupMetrics`; states (running and waiting requests, KV blocks,
prefix-cache and lookahead totals) are read from the engines when Prometheus scrapes, so a
scrape always sees the present and the step loop pays nothing for them. Every engine-level
series carries a `worker_group` label.

Each `Metrics` has its own registry: several servers (or tests) in one process never collide.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "shardserve:"
_GROUP = ("worker_group",)

# Latencies from a millisecond-scale GPU step to a long CPU request.
_SECONDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)  # fmt: skip
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()

        def counter(name, doc, labels=_GROUP):
            return Counter(PREFIX + name, doc, labels, registry=r)

        def histogram(name, doc, buckets, labels=_GROUP):
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=r)

        self.http_requests = counter(
            "http_requests", "HTTP responses by route and status", ("route", "status")
        )
        self.rejected = counter(
            "request_rejected", "requests refused before they were queued, by reason", ("reason",)
        )
        self.request_success = counter(
            "request_success", "finished requests by finish reason", _GROUP + ("finished_reason",)
        )
        self.prompt_tokens = counter("prompt_tokens", "prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "tokens generated")
        self.queue_time = histogram(
            "request_queue_time_seconds", "arrival to first scheduled step", _SECONDS
        )
        self.ttft = histogram("time_to_first_token_seconds", "arrival to first token", _SECONDS)
        self.itl = histogram(
            "inter_token_latency_seconds", "time between a request's tokens", _SECONDS
        )
        self.e2e = histogram("e2e_request_latency_seconds", "arrival to finish", _SECONDS)
        self.inference = histogram(
            "request_inference_time_seconds", "first scheduled step to finish", _SECONDS
        )
        self.prefill = histogram(
            "request_prefill_time_seconds", "first scheduled step to first token", _SECONDS
        )
        self.decode = histogram("request_decode_time_seconds", "first token to finish", _SECONDS)
        self.tpot = histogram(
            "request_time_per_output_token_seconds",
            "a request's decode time over its tokens after the first",
            _SECONDS,
        )
        self.prompt_len = histogram("request_prompt_tokens", "prompt length", _TOKENS)
        self.output_len = histogram("request_generation_tokens", "output length", _TOKENS)
        self.step_duration = histogram(
            "step_duration_seconds", "one step: schedule, shard forward, update", _SECONDS
        )
        self.step_seqs = histogram("step_batch_size", "sequences in a step", _BATCH)
        self.step_tokens = histogram("iteration_tokens_total", "tokens in a step", _TOKENS)
        self._pools: list = []
        r.register(_LiveState(self._pools))

    def watch(self, pool) -> None:
        """Read this EnginePool's live state at each scrape."""
        self._pools.append(pool)

    def group(self, index: int) -> GroupMetrics:
        return GroupMetrics(self, str(index))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class GroupMetrics:
    """One worker group's event metrics, with its label bound once."""

    def __init__(self, m: Metrics, group: str) -> None:
        self.m = m
        self.group = group
        self.queue_time = m.queue_time.labels(group)
        self.ttft = m.ttft.labels(group)
        self.itl = m.itl.labels(group)
        self.e2e = m.e2e.labels(group)
        self.inference = m.inference.labels(group)
        self.prefill = m.prefill.labels(group)
        self.decode = m.decode.labels(group)
        self.tpot = m.tpot.labels(group)
        self.generation_tokens = m.generation_tokens.labels(group)
        self.step_duration = m.step_duration.labels(group)
        self.step_seqs = m.step_seqs.labels(group)
        self.step_tokens = m.step_tokens.labels(group)

    def tokens(self, n: int, seconds_since_last: float | None) -> None:
        """`n` tokens arrived for a request, `seconds_since_last` after its previous ones (None
        for its first)."""
        self.generation_tokens.inc(n)
        if seconds_since_last is not None:
            for _ in range(n):  # tokens verified together share the wait
                self.itl.observe(seconds_since_last / n)

    def finished(self, account: dict) -> None:
        """A finished request's account (router/engine/outputs.py `Stream.account`: finish
        reason, token counts, and queue_s / ttft_s / total_s from its arrival)."""
        m, g = self.m, self.group
        m.request_success.labels(g, account["finish_reason"]).inc()
        m.prompt_tokens.labels(g).inc(account["prompt_tokens"])
        m.prompt_len.labels(g).observe(account["prompt_tokens"])
        m.output_len.labels(g).observe(account["output_tokens"])
        queued, first, total = account["queue_s"], account["ttft_s"], account["total_s"]
        self.e2e.observe(total)
        if queued < total:  # it was scheduled: vLLM's phases of a request
            self.inference.observe(total - queued)
            if first is not None:
                self.prefill.observe(first - queued)
                self.decode.observe(total - first)
                if account["output_tokens"] > 1:
                    self.tpot.observe((total - first) / (account["output_tokens"] - 1))

    def step(self, seconds: float, num_seqs: int, num_tokens: int) -> None:
        self.step_duration.observe(seconds)
        self.step_seqs.observe(num_seqs)
        self.step_tokens.observe(num_tokens)


class _LiveState:
    """Gauges and totals read from the engines at scrape time."""

    def __init__(self, pools: list) -> None:
        self.pools = pools

    def collect(self):
        def gauge(name, doc):
            return GaugeMetricFamily(PREFIX + name, doc, labels=_GROUP)

        def total(name, doc):
            return CounterMetricFamily(PREFIX + name, doc, labels=_GROUP)

        families = {
            "running": gauge("num_requests_running", "requests in the running batch"),
            "waiting": gauge(
                "num_requests_waiting", "requests waiting for a slot or a step (incl. pre-empted)"
            ),
            "waiting_tokens": gauge("num_waiting_prompt_tokens", "prompt tokens waiting"),
            "usage": gauge("kv_cache_usage_perc", "share of KV blocks in use (0-1)"),
            "used": gauge("kv_blocks_used", "KV blocks held by running requests or the cache"),
            "free": gauge("kv_blocks_free", "KV blocks free"),
            "queries": total("prefix_cache_queries", "prompt blocks looked up in the cache"),
            "hits": total("prefix_cache_hits", "prompt blocks found in the cache"),
            "preempted": total("num_preemptions", "sequences pre-empted for KV blocks"),
            "drafts": total("spec_decode_num_draft_tokens", "lookahead draft tokens verified"),
            "accepted": total("spec_decode_num_accepted_tokens", "lookahead drafts accepted"),
            "dead": gauge("engine_dead", "1 when the worker group's shard has died"),
        }
        for pool in self.pools:
            for i, e in enumerate(pool.engines):
                s = e.live_state()
                for key, family in families.items():
                    family.add_metric([str(i)], s[key])
        yield from families.values()


class CountResponses:
    """ASGI middleware: every HTTP response counted by route and status (unknown paths as
    `other`, so a scan cannot grow the label set)."""

    def __init__(self, app, metrics: Metrics, routes: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
