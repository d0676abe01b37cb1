"""What the router process is told by the launcher (the router never reads the environment).
No field has a default: launcher/plan.py derives every one from the launcher's `Config`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SETTINGS_ENV = "SHARDSERVE_ROUTER_SETTINGS"


@dataclass(frozen=True)
class RouterSettings:
    model_path: str
    model_name: str
    shard_sockets: tuple[str, ...]
    conv_template: str | None
    trust_remote_code: bool
    api_keys: tuple[str, ...]
    host: str
    port: int
    max_concurrency: int
    max_num_batched_tokens: int
    max_num_seqs: int
    enable_prefix_caching: bool
    quantization: str  # as resolved, for the log
    quality_check: bool
    use_lookahead: bool
    num_speculative_tokens: int
    max_waiting_requests: int  # per worker group; 0: no bound
    max_waiting_tokens: int
    stuck_step_timeout: float
    shutdown_timeout: float
    request_timeout: float  # 0: none
    queue_timeout: float
    scheduler: str  # "continuous" or "dynamic-batching" (the DeepSpeed image's)
    max_batch_size: int
    batch_wait_timeout: float

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> RouterSettings:
        d = dict(d)
        d["shard_sockets"] = tuple(d["shard_sockets"])
        d["api_keys"] = tuple(d["api_keys"])
        return RouterSettings(**d)
