"""Checks on a resolved `Config` that argparse cannot make: ranges and combinations. Each
error names the flag."""

from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.flags import ConfigError

if TYPE_CHECKING:
    from launcher.config import Config


def validate(c: Config) -> None:
    def positive(name: str, flag: str, value, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if value is None or value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value}")

    positive("worker_num", "--worker-num", c.worker_num)
    positive("limit_worker_concurrency", "--limit-worker-concurrency", c.limit_worker_concurrency)
    positive("max_num_seqs", "--max-num-seqs", c.max_num_seqs)
    positive("block_size", "--block-size", c.block_size)
    positive("kv_cache_memory", "--kv-cache-memory", c.kv_cache_memory)
    positive("max_model_len", "--max-model-len", c.max_model_len, allow_none=True)
    positive(
        "max_num_batched_tokens",
        "--max-num-batched-tokens",
        c.max_num_batched_tokens,
        allow_none=True,
    )
    positive("num_gpus", "--num-gpus", c.num_gpus, allow_none=True)
    positive("nnodes", "--nnodes", c.nnodes)
    positive("collective_timeout", "--collective-timeout", c.collective_timeout)
    if not 0 <= c.node_rank < c.nnodes:
        raise ConfigError(f"--node-rank must be in 0..{c.nnodes - 1}, got {c.node_rank}")
    if c.nnodes > 1 and c.master_port is None:
        raise ConfigError("--nnodes > 1 needs --master-port (MASTER_PORT), the same on every node")
    positive("num_speculative_tokens", "--num-speculative-tokens", c.num_speculative_tokens)
    positive("max_batch_size", "--max-batch-size", c.max_batch_size)
    if not 0.0 < c.gpu_memory_utilization <= 1.0:
        raise ConfigError(
            f"--gpu-memory-utilization must be in (0, 1], got {c.gpu_memory_utilization}"
        )
    if min(c.max_waiting_requests, c.max_waiting_tokens) < 0:
        raise ConfigError("--max-waiting-requests and --max-waiting-tokens must be >= 0 (0: none)")
    positive("stuck_step_timeout", "--stuck-step-timeout", c.stuck_step_timeout)
    if min(c.request_timeout, c.queue_timeout) < 0:
        raise ConfigError("--request-timeout and --queue-timeout must be >= 0 (0: none)")
    if c.shutdown_timeout < 0:
        raise ConfigError(f"--shutdown-timeout must be >= 0, got {c.shutdown_timeout}")
    if c.batch_wait_timeout < 0:
        raise ConfigError(f"--batch-wait-timeout must be >= 0, got {c.batch_wait_timeout}")
    if not 0 < c.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {c.port}")
