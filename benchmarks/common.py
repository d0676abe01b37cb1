"""What the benchmarks share: how a run ends (its table, its JSON), and servers started and
stopped as processes on a free local port."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx

from launcher.groups import free_port

__all__ = ["free_port", "ours_cmd", "start_server", "stop_server", "write_report"]


def write_report(text: str, report: dict, json_path: str | None) -> None:
    """A benchmark's ending: the table on stdout, the figures as JSON where asked."""
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)


def ours_cmd(model: str, port: int, quantization: str, scheduler: str) -> list[str]:
    """Our server, as `shardserve serve` starts it."""
    return [
        sys.executable, "-m", "launcher", "serve", "--model-path", model,
        "--quantization", quantization, "--scheduler", scheduler,
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def start_server(cmd: list[str], url: str, health: str, deadline: float = 600) -> subprocess.Popen:
    """`cmd` started, once `url + health` answers 200."""
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


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
