"""What an operator sees: /metrics, liveness and readiness, and the waiting-request bound."""

from __future__ import annotations

import os
import shutil
import signal

import httpx
from prometheus_client.parser import text_string_to_metric_families

from integration.conftest import Server, shard_pids, start_server, wait_until

CHAT = "/v1/chat/completions"


def scrape(server) -> dict[tuple, float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    r = httpx.get(f"{server.url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted({k: str(v) for k, v in labels.items()}.items()))), 0.0)


def _chat(server, max_tokens: int, **kw) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, **kw}  # fmt: skip
    return httpx.post(f"{server.url}{CHAT}", json=body, timeout=120)


def test_a_request_is_counted_in_every_metric(tiny_server):
    before = scrape(tiny_server)
    r = _chat(tiny_server, 5)
    assert r.status_code == 200
    bad = httpx.post(f"{tiny_server.url}{CHAT}", content=b"{not json", timeout=10)
    assert bad.status_code == 400
    after = scrape(tiny_server)
    usage = r.json()["usage"]
    g = {"worker_group": 0}

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    p = "shardserve:"
    assert delta(p + "request_success_total", finished_reason="length", **g) == 1
    assert delta(p + "prompt_tokens_total", **g) == usage["prompt_tokens"]
    assert delta(p + "generation_tokens_total", **g) == 5
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds", "request_prompt_tokens",
              "request_inference_time_seconds", "request_prefill_time_seconds",
              "request_decode_time_seconds", "request_time_per_output_token_seconds"):  # fmt: skip
        assert delta(f"{p}{h}_count", **g) == 1, h
    # the phases add up: prefill + decode = inference <= end to end
    phases = delta(p + "request_prefill_time_seconds_sum", **g) + delta(
        p + "request_decode_time_seconds_sum", **g
    )
    inference = delta(p + "request_inference_time_seconds_sum", **g)
    assert abs(phases - inference) < 1e-6
    assert inference <= delta(p + "e2e_request_latency_seconds_sum", **g) + 1e-6
    assert delta(p + "request_prompt_tokens_sum", **g) == usage["prompt_tokens"]
    assert delta(p + "inter_token_latency_seconds_count", **g) == 4  # 5 tokens, 4 gaps
    assert delta(p + "step_duration_seconds_count", **g) >= 5  # a prefill and 4 decodes, or more
    assert delta(p + "http_requests_total", route=CHAT, status=200) == 1
    assert delta(p + "http_requests_total", route=CHAT, status=400) == 1
    # live state, read at the scrape: nothing is running now, the prefix cache kept blocks
    assert value(after, p + "num_requests_running", **g) == 0
    assert value(after, p + "num_requests_waiting", **g) == 0
    assert 0 <= value(after, p + "kv_cache_usage_perc", **g) <= 1
    assert value(after, p + "kv_blocks_free", **g) > 0
    assert delta(p + "prefix_cache_queries_total", **g) >= 1
    assert value(after, p + "engine_dead", **g) == 0


def test_health_is_live_and_ready(tiny_server):
    for path in ("/health/live", "/health/ready", "/health"):
        r = httpx.get(tiny_server.url + path, timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ok", path


def _own_server(tmp_path_factory, tiny_folder, name: str, *args: str):
    """A server on its own copy of the tiny model, whose path finds its shard process."""
    folder = tmp_path_factory.mktemp(name) / "model"
    shutil.copytree(tiny_folder, folder)
    server = start_server(
        tmp_path_factory, name, ["--model-path", str(folder), "--kv-cache-memory", "64MiB", *args]
    )
    (shard,) = shard_pids(str(folder))
    return server, shard


def _first_token(stream):
    """Read up to the stream's first token; the rest of its lines, from there."""
    lines = stream.iter_lines()
    for line in lines:
        if '"content"' in line and '"role"' not in line:
            break
    return lines


LONG = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "ignore_eos": True,
        "temperature": 0, "stream": True}  # fmt: skip


def test_past_the_waiting_bound_requests_get_429_and_nothing_is_lost(tmp_path_factory, tiny_folder):
    bounds = ("--limit-worker-concurrency", "1", "--max-waiting-requests", "1")
    server, shard = _own_server(tmp_path_factory, tiny_folder, "bounded", *bounds)
    waiting = "shardserve:num_requests_waiting"
    try:
        with httpx.stream("POST", f"{server.url}{CHAT}", json=LONG, timeout=120) as running:
            held = _first_token(running)  # it holds the only slot...
            os.kill(shard, signal.SIGSTOP)  # ...until the shard moves again
            try:
                with httpx.stream("POST", f"{server.url}{CHAT}", json=LONG, timeout=120) as queued:
                    assert queued.status_code == 200
                    assert wait_until(lambda: value(scrape(server), waiting, worker_group=0) == 1)
                    refused = _chat(server, 4)
                    assert refused.status_code == 429
                    assert refused.headers["retry-after"] == "1"
                    err = refused.json()["error"]
                    assert err["type"] == "rate_limit_error" and err["code"] == "waiting_requests"
                    assert "--max-waiting-requests 1" in err["message"]
                    os.kill(shard, signal.SIGCONT)
            finally:
                os.kill(shard, signal.SIGCONT)
            assert any('"finish_reason":"length"' in line for line in held)  # nothing was lost
        assert wait_until(lambda: value(scrape(server), waiting, worker_group=0) == 0)
        assert wait_until(lambda: server.stats()["active_requests"] == 0)
        assert _chat(server, 4).status_code == 200
        m = scrape(server)
        assert value(m, "shardserve:request_rejected_total", reason="waiting_requests") == 1
        assert value(m, "shardserve:http_requests_total", route=CHAT, status=429) == 1
    finally:
        server.stop()


def test_while_loading_live_is_200_and_ready_503(tmp_path_factory, tiny_folder):
    """The shard is paused as soon as it exists, so it cannot finish loading until let go."""
    folder = tmp_path_factory.mktemp("loading") / "model"
    shutil.copytree(tiny_folder, folder)
    log = tmp_path_factory.mktemp("server-loading") / "server.log"
    server = Server(["--model-path", str(folder), "--kv-cache-memory", "64MiB"], None, log)
    try:
        assert wait_until(lambda: shard_pids(str(folder)), deadline=120)
        (shard,) = shard_pids(str(folder))
        os.kill(shard, signal.SIGSTOP)
        try:
            assert wait_until(lambda: _answers(server, "/health/live"), deadline=120)
            live = httpx.get(f"{server.url}/health/live", timeout=5)
            assert live.status_code == 200 and live.json()["status"] == "loading"
            for path in ("/health/ready", "/health"):
                r = httpx.get(server.url + path, timeout=5)
                assert r.status_code == 503 and r.json()["status"] == "loading", path
            r = httpx.post(f"{server.url}{CHAT}", json=LONG, timeout=10)
            assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        finally:
            os.kill(shard, signal.SIGCONT)
        server.wait_ready()
        assert _ready(server) == 200
    finally:
        server.stop()


def _answers(server, path: str) -> bool:
    try:
        httpx.get(server.url + path, timeout=2)
        return True
    except httpx.TransportError:
        return False


def test_a_stuck_step_fails_liveness_and_readiness_until_it_moves(tmp_path_factory, tiny_folder):
    server, shard = _own_server(tmp_path_factory, tiny_folder, "stuck", "--stuck-step-timeout", "1")
    try:
        with httpx.stream("POST", f"{server.url}{CHAT}", json=LONG, timeout=120) as r:
            rest = _first_token(r)
            os.kill(shard, signal.SIGSTOP)  # a step now never returns, as in a hung collective
            try:
                assert wait_until(
                    lambda: httpx.get(f"{server.url}/health/live", timeout=5).status_code == 503
                )
                live = httpx.get(f"{server.url}/health/live", timeout=5).json()
                assert live["status"] == "stuck" and live["step_seconds"] >= 1
                assert httpx.get(f"{server.url}/health/ready", timeout=5).status_code == 503
                assert httpx.get(f"{server.url}/health", timeout=5).status_code == 503
            finally:
                os.kill(shard, signal.SIGCONT)
            assert wait_until(
                lambda: httpx.get(f"{server.url}/health/live", timeout=5).status_code == 200
            )
            assert any('"finish_reason":"length"' in line for line in rest)
        assert httpx.get(f"{server.url}/health/ready", timeout=5).status_code == 200
    finally:
        server.stop()


def _ready(server) -> int:
    return httpx.get(f"{server.url}/health/ready", timeout=5).status_code


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path_factory, tiny_folder):
    server, shard = _own_server(tmp_path_factory, tiny_folder, "drain")
    try:
        with httpx.stream("POST", f"{server.url}{CHAT}", json=LONG, timeout=120) as r:
            rest = _first_token(r)
            os.kill(shard, signal.SIGSTOP)  # hold the request in flight while we look
            try:
                server.proc.send_signal(signal.SIGTERM)
                assert wait_until(lambda: _ready(server) == 503)
                assert httpx.get(f"{server.url}/health/ready", timeout=5).json() == {
                    "status": "draining"
                }
                assert httpx.get(f"{server.url}/health/live", timeout=5).status_code == 200
                refused = _chat(server, 4)
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            finally:
                os.kill(shard, signal.SIGCONT)
            # the request in flight is not cut: it runs to its end
            assert any('"finish_reason":"length"' in line for line in rest)
        assert server.proc.wait(timeout=60) == 0
        logs = server.logs()
        assert "draining" in logs and "drained; stopping" in logs
    finally:
        server.stop()


def test_a_second_sigterm_stops_at_once(tmp_path_factory, tiny_folder):
    server, shard = _own_server(tmp_path_factory, tiny_folder, "drain-twice")
    try:
        with httpx.stream("POST", f"{server.url}{CHAT}", json=LONG, timeout=120) as r:
            _held = _first_token(r)  # kept: dropping the lines would close the stream
            os.kill(shard, signal.SIGSTOP)  # the request can never finish by itself
            try:
                server.proc.send_signal(signal.SIGTERM)
                assert wait_until(lambda: _ready(server) == 503)
                server.proc.send_signal(signal.SIGTERM)
            finally:
                os.kill(shard, signal.SIGCONT)
            # well inside the default 30 s shutdown timeout
            assert server.proc.wait(timeout=20) == 0
        assert "again; stopping now" in server.logs()
    finally:
        server.stop()
