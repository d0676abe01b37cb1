"""What the router process is told by the launcher (the router never reads the environment)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SETTINGS_ENV = "SHARDSERVE_ROUTER_SETTINGS"


@dataclass(frozen=True)
class RouterSettings:
    model_path: str
    model_name: str
    shard_sockets: tuple[str, ...]
    conv_template: str | None = None
    trust_remote_code: bool = False
    api_keys: tuple[str, ...] = ()
    host: str = "0.0.0.0"
    port: int = 8501
    max_concurrency: int = 128
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    quantization: str = "none"  # as resolved, for the log
    quality_check: bool = False
    use_lookahead: bool = False
    num_speculative_tokens: int = 8
    max_waiting_requests: int = 512  # per worker group; 0: no bound
    max_waiting_tokens: int = 262144
    stuck_step_timeout: float = 60.0
    shutdown_timeout: float = 30.0
    request_timeout: float = 0.0  # 0: none
    queue_timeout: float = 0.0
    scheduler: str = "continuous"  # or "dynamic-batching" (the DeepSpeed image's)
    max_batch_size: int = 16
    batch_wait_timeout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> RouterSettings:
        d = dict(d)
        d["shard_sockets"] = tuple(d["shard_sockets"])
        d["api_keys"] = tuple(d["api_keys"])
        return RouterSettings(**d)
