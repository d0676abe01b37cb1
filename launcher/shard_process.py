"""Start a worker group as processes (`python -m shards.server`, one per rank) and connect to
its rank 0."""

from __future__ import annotations

import subprocess
import sys
import tempfile

from launcher.groups import group_specs, shard_argv, socket_path
from router.engine.shard_client import ShardClient, ShardError
from shards.wire import ShardInfo, ShardSpec, StepPlan, StepResult


class ShardProcess:
    def __init__(self, spec: ShardSpec, socket_dir: str | None = None) -> None:
        self._dir = socket_dir or tempfile.mkdtemp(prefix="shardserve-")
        self.socket_path = socket_path(self._dir, spec.group_index)
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "shards.server", *shard_argv(rank, self.socket_path)]
            )
            for rank in group_specs(spec, spec.world_size, spec.group_index)
        ]
        self.proc = self.procs[0]
        try:
            self.client = ShardClient(
                self.socket_path, is_alive=lambda: all(p.poll() is None for p in self.procs)
            )
            self._info = self.client.wait_ready()
        except ShardError:
            self._kill()
            raise

    def info(self) -> ShardInfo:
        return self._info

    def execute(self, plan: StepPlan) -> StepResult:
        return self.client.execute(plan)

    def _kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.client.close()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
