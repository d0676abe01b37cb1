"""The launcher: start-up errors name what to fix; a dead child takes the server down with a
clear message and a non-zero exit; SIGTERM stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from integration.conftest import ROOT, start_server


def _serve(
    args: list[str], env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher", "serve", "--port", "1", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_missing_model_folder_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    r = _serve(["--model-path", str(missing)])
    assert r.returncode == 2
    assert str(missing) in r.stderr


def test_folder_without_weights_is_named(tmp_path, tiny_folder):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text((Path(tiny_folder) / "config.json").read_text())
    r = _serve(["--model-path", str(folder)])
    assert r.returncode == 2
    assert "no model weights" in r.stderr and str(folder) in r.stderr


@pytest.mark.parametrize(
    "args,env,needle",
    [
        (["--num-gpus", "3"], {}, "tensor parallel size 3 does not divide 4 attention heads"),
        (["--nnodes", "2"], {}, "--master-port"),
        (["--nnodes", "2", "--master-port", "1234"], {"WORKER_NUM": "2"}, "one worker group"),
        (["--node-rank", "1"], {}, "--node-rank must be in 0..0"),
        ([], {"QUANTIZATION": "smoothquant"}, "shardserve quantize"),
        (["--num-gpus", "2"], {"QUANTIZATION": "ifq_nf4"}, "divisible by its group of 64"),
        ([], {"CONV_TEMPLATE": "no-such-template"}, "llama-3"),
        ([], {"TP": "zero"}, "TP"),
    ],
)
def test_refused_at_start_up_with_a_clear_message(tiny_folder, args, env, needle):
    r = _serve(["--model-path", str(tiny_folder), *args], env)
    assert r.returncode == 2
    assert needle in r.stderr


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def _shard_pid(server) -> int:
    for pid in _children(server.proc.pid):
        if "shards.server" in Path(f"/proc/{pid}/cmdline").read_text():
            return pid
    raise AssertionError("no shard process")


def test_killed_shard_stops_the_server_with_a_message(tmp_path_factory, tiny_folder):
    server = start_server(
        tmp_path_factory, "kill", ["--model-path", str(tiny_folder), "--kv-cache-memory", "32MiB"]
    )
    children = _children(server.proc.pid)
    os.kill(_shard_pid(server), signal.SIGKILL)
    code = server.proc.wait(timeout=60)
    assert code != 0
    assert "shard 0/1 of worker group 0" in server.logs() and "exited with code -9" in server.logs()
    deadline = time.monotonic() + 30
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(c) for c in children), "orphaned children"
    server.stop()


def test_sigterm_stops_everything_with_exit_zero(tmp_path_factory, tiny_folder):
    server = start_server(
        tmp_path_factory, "term", ["--model-path", str(tiny_folder), "--kv-cache-memory", "32MiB"]
    )
    children = _children(server.proc.pid)
    assert len(children) == 2
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0
    assert not any(_alive(c) for c in children)
    server.stop()
