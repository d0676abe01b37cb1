"""Start a shard as its own process (`python -m shards.server`) and connect to it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import orjson

from router.shard_client import ShardClient, ShardError
from shards.wire import ShardInfo, ShardSpec, StepPlan, StepResult, to_dict


class ShardProcess:
    def __init__(self, spec: ShardSpec, socket_dir: str | None = None) -> None:
        self._dir = socket_dir or tempfile.mkdtemp(prefix="shardserve-")
        self.socket_path = os.path.join(self._dir, f"shard-{spec.rank}.sock")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shards.server",
                "--socket",
                self.socket_path,
                "--spec",
                orjson.dumps(to_dict(spec)).decode(),
            ],
        )
        try:
            self.client = ShardClient(self.socket_path, is_alive=lambda: self.proc.poll() is None)
            self._info = self.client.wait_ready()
        except ShardError:
            self.proc.wait(timeout=30)
            raise

    def info(self) -> ShardInfo:
        return self._info

    def execute(self, plan: StepPlan) -> StepResult:
        return self.client.execute(plan)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.client.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
