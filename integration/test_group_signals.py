"""Stop signals sent to the server's whole process group, as systemd's control-group kill (SIGTERM)
and a terminal's Ctrl-C (SIGINT) send them: only the launcher acts, so SIGTERM drains the
streams in flight exactly as a SIGTERM to the launcher alone does, and nothing logs a failure."""

from __future__ import annotations

import os
import shutil
import signal
import threading

import httpx

from integration.conftest import shard_pids, start_server, wait_until

CHAT = "/v1/chat/completions"
STREAMS = 4
MAX_TOKENS = 48


def _group_server(tmp_path_factory, tiny_folder, name: str):
    """A server in a process group of its own, on its own copy of the tiny model (whose path
    finds its shard process)."""
    folder = tmp_path_factory.mktemp(name) / "model"
    shutil.copytree(tiny_folder, folder)
    args = ["--model-path", str(folder), "--kv-cache-memory", "64MiB"]
    server = start_server(tmp_path_factory, name, args, own_group=True)
    (shard,) = shard_pids(str(folder))
    return server, shard


def _stream(server, started: threading.Barrier, lines: list[str]) -> None:
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{server.url}{CHAT}", json=body, timeout=120) as r:
        waiting = True
        for line in r.iter_lines():
            lines.append(line)
            if waiting and '"content"' in line and '"role"' not in line:
                waiting = False
                started.wait(timeout=60)  # every stream has its first token


def _ready(server) -> int:
    return httpx.get(f"{server.url}/health/ready", timeout=5).status_code


def _failures(logs: str) -> list[str]:
    bad = (" ERROR ", "exited with code", "Traceback", "KeyboardInterrupt")
    return [line for line in logs.splitlines() if any(b in line for b in bad)]


def test_sigterm_to_the_group_drains_every_stream_and_exits_0(tmp_path_factory, tiny_folder):
    server, shard = _group_server(tmp_path_factory, tiny_folder, "group-term")
    started = threading.Barrier(STREAMS + 1)
    outputs: list[list[str]] = [[] for _ in range(STREAMS)]
    threads = [
        threading.Thread(target=_stream, args=(server, started, out), daemon=True)
        for out in outputs
    ]
    try:
        for t in threads:
            t.start()
        started.wait(timeout=120)
        os.kill(shard, signal.SIGSTOP)  # the streams stay in flight while the signal lands
        try:
            os.killpg(server.proc.pid, signal.SIGTERM)  # the shard gets it on SIGCONT
            assert wait_until(lambda: _ready(server) == 503)
        finally:
            os.kill(shard, signal.SIGCONT)
        for t in threads:
            t.join(timeout=120)
        for lines in outputs:
            lines = [line for line in lines if line]
            assert lines[-1] == "data: [DONE]", lines[-3:]
            assert f'"completion_tokens":{MAX_TOKENS},' in lines[-2], lines[-2]
            assert any('"finish_reason":"length"' in line for line in lines)
        assert server.proc.wait(timeout=60) == 0
        logs = server.logs()
        assert "drained; stopping" in logs
        assert not _failures(logs), _failures(logs)
    finally:
        server.stop()


def test_sigint_to_the_group_stops_at_once_with_exit_0(tmp_path_factory, tiny_folder):
    server, _ = _group_server(tmp_path_factory, tiny_folder, "group-int")
    try:
        os.killpg(server.proc.pid, signal.SIGINT)
        assert server.proc.wait(timeout=30) == 0
        logs = server.logs()
        assert "received SIGINT; stopping" in logs
        assert not _failures(logs), _failures(logs)
    finally:
        server.stop()
