"""Spawn children and watch them: any child that exits takes the server down with it.

Children get PR_SET_PDEATHSIG so a launcher killed without a chance to clean up (SIGKILL) does
not leave orphans behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("shardserve.launcher")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Not Linux: the launcher's own handlers still stop children.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen


def spawn(name: str, module: str, args: list[str], env: dict | None = None) -> Child:
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        preexec_fn=_die_with_parent,
        env={**os.environ, **(env or {})},
    )
    log.info("started %s (pid %d)", name, proc.pid)
    return Child(name, proc)


def stop_all(children: list[Child], timeout: float = 10.0) -> None:
    for c in children:
        if c.proc.poll() is None:
            c.proc.terminate()
    deadline = time.monotonic() + timeout
    for c in children:
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", c.name, timeout)
            c.proc.kill()
            c.proc.wait()


class Supervisor:
    """Wait until a child exits or a stop signal arrives; then stop everything."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self._signal: int | None = None

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    def run(self, poll_seconds: float = 0.2) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        try:
            while self._signal is None:
                for c in self.children:
                    code = c.proc.poll()
                    if code is not None:
                        log.error("%s exited with code %d; stopping the server", c.name, code)
                        stop_all(self.children)
                        return 1
                time.sleep(poll_seconds)
            log.info("received %s; stopping", signal.Signals(self._signal).name)
            stop_all(self.children)
            return 0
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
