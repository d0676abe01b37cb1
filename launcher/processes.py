"""Spawn children and watch them. The router exiting takes the server down; so does a shard
exiting, unless other worker groups (WORKER_NUM > 1) are still whole: then its group is stopped
and reported, and the router fails that group's requests and routes new ones elsewhere.

Children leave SIGTERM and SIGINT to the launcher (a service manager or a terminal signals the
whole process group; shards/wire.py), which passes on DRAIN_SIGNAL and STOP_SIGNAL. They get
STOP_SIGNAL as PR_SET_PDEATHSIG too, so a launcher killed without a chance to clean up (SIGKILL)
does not leave orphans behind.
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

from shards.wire import DRAIN_SIGNAL, STOP_SIGNAL

log = logging.getLogger("shardserve.launcher")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Not Linux: the launcher's own handlers still stop children.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, STOP_SIGNAL)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    group: int | None = None  # worker group of a shard; None for the router


def spawn(
    name: str, module: str, args: list[str], env: dict | None = None, group: int | None = None
) -> Child:
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        preexec_fn=_die_with_parent,
        env={**os.environ, **(env or {})},
    )
    log.info("started %s (pid %d)", name, proc.pid)
    return Child(name, proc, group)


def stop_all(children: list[Child], timeout: float = 10.0) -> None:
    for c in children:
        if c.proc.poll() is None:
            c.proc.send_signal(STOP_SIGNAL)
    deadline = time.monotonic() + timeout
    for c in children:
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", c.name, timeout)
            c.proc.kill()
            c.proc.wait()


class Supervisor:
    """Wait until the server must stop (a child exits, or a stop signal); then stop everything.

    SIGTERM first lets `drain` (the router) finish its requests: it is told to drain, and the
    shards stop once it has exited (or once a second signal comes). SIGINT (Ctrl-C, which the
    whole terminal group receives) stops at once. Returns the launcher's exit code: 0 after a
    signal, 1 after a failure."""

    def __init__(
        self,
        children: list[Child],
        num_groups: int = 1,
        drain: Child | None = None,
        shutdown_timeout: float = 30.0,
    ) -> None:
        self.children = children
        self.num_groups = num_groups
        self.drain = drain
        self.shutdown_timeout = shutdown_timeout
        self.dead_groups: set[int] = set()
        self._signal: int | None = None

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    def _check(self, ignore: Child | None = None) -> int | None:
        """The launcher's exit code when the server must stop, else None."""
        for c in self.children:
            if c is ignore or c.group in self.dead_groups:
                continue
            code = c.proc.poll()
            if code is None:
                continue
            if code == 0 and c.group is not None:
                # A shard exits cleanly only when its rank 0 (maybe on another node) was told
                # to shut down: this is a normal stop.
                log.info("%s finished; stopping", c.name)
                return 0
            log.error("%s (pid %d) exited with code %d", c.name, c.proc.pid, code)
            if c.group is None or self.num_groups == 1:
                log.error("stopping the server")
                return 1
            self.dead_groups.add(c.group)
            stop_all([o for o in self.children if o.group == c.group])
            alive = self.num_groups - len(self.dead_groups)
            if not alive:
                log.error("every worker group is down; stopping the server")
                return 1
            log.error("worker group %d is down; %d group(s) still serving", c.group, alive)
        return None

    def run(self, poll_seconds: float = 0.2) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        try:
            while self._signal is None:
                code = self._check()
                if code is not None:
                    stop_all(self.children)
                    return code
                time.sleep(poll_seconds)
            if self._signal == signal.SIGTERM and self.drain and self.drain.proc.poll() is None:
                return self._drain(poll_seconds)
            log.info("received %s; stopping", signal.Signals(self._signal).name)
            stop_all(self.children)
            return 0
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)

    def _drain(self, poll_seconds: float) -> int:
        log.info(
            "received SIGTERM; draining for up to %.0fs (a second signal stops at once)",
            self.shutdown_timeout,
        )
        self._signal = None
        self.drain.proc.send_signal(DRAIN_SIGNAL)
        deadline = time.monotonic() + self.shutdown_timeout + 15  # its timeout, then its exit
        code = None
        while self.drain.proc.poll() is None and self._signal is None:
            code = self._check(ignore=self.drain)
            if code is not None or time.monotonic() > deadline:
                break
            time.sleep(poll_seconds)
        if self._signal is not None:
            log.info("received %s again; stopping now", signal.Signals(self._signal).name)
        elif self.drain.proc.poll() is None and code is None:
            log.warning("%s did not finish draining in time; stopping", self.drain.name)
        stop_all(self.children)
        return code or 0
