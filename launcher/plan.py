"""Every process's settings, derived from one `Config` (launcher/config.py, the only place a
default lives): the shards' `ShardSpec`, the router's `RouterSettings`, and the offline `LLM`'s
shard and scheduler, so that it runs what a server started with the same flags runs.
`ShardSpec` and `RouterSettings` carry no defaults of their own for what `Config` sets
(tests/launcher/test_config.py holds them to it)."""

from __future__ import annotations

import dataclasses

from launcher.config import Config, ConfigError
from router.settings import RouterSettings
from shards.wire import ShardSpec

# A chunk budget no smaller than this, whatever the context (a prompt up to here runs in one
# step), unless --max-num-batched-tokens says otherwise.
MIN_BATCHED_TOKENS = 2048


def config_with(base: Config | None = None, **fields) -> Config:
    """`base` (default: `Config()`) with `fields` set, a field given as None left as it is (the
    offline API's keyword arguments are None when not given)."""
    given = {k: v for k, v in fields.items() if v is not None}
    return dataclasses.replace(base or Config(), **given)


def max_model_len(c: Config, model_config) -> int:
    """The context length served: --max-model-len, or the checkpoint's own."""
    native = model_config.max_position_embeddings
    if c.max_model_len is None:
        return native
    if c.max_model_len > native and model_config.rope_scaling is None:
        raise ConfigError(
            f"--max-model-len {c.max_model_len} exceeds the model's context of {native} tokens"
        )
    return c.max_model_len


def batched_tokens(c: Config, max_len: int | None) -> int:
    """The tokens one step may hold, as the scheduler plans them and the shard sizes for them."""
    return c.max_num_batched_tokens or max(max_len or 0, MIN_BATCHED_TOKENS)


def shard_spec(
    c: Config, model_path: str, quantization: str, max_len: int | None, **local
) -> ShardSpec:
    """A shard's spec: `local` sets what the launcher decides per machine and rank (device,
    threads, ranks) and the knobs tests and benchmarks turn (fast_kernels, cpu_kernels)."""
    return ShardSpec(
        model_path=model_path,
        dtype=c.dtype,
        block_size=c.block_size,
        kv_cache_memory=c.kv_cache_memory,
        gpu_memory_utilization=c.gpu_memory_utilization,
        max_model_len=max_len,
        max_num_batched_tokens=batched_tokens(c, max_len),
        seed=c.seed,
        quantization=quantization,
        enforce_eager=c.enforce_eager,
        cpu_compile=c.cpu_compile,
        lookahead=c.use_lookahead,
        master_addr=c.master_addr,
        master_port=c.master_port or 0,
        collective_timeout_s=c.collective_timeout,
        **local,
    )


def router_settings(
    c: Config,
    model_path: str,
    model_name: str,
    shard_sockets: tuple[str, ...],
    quantization: str,
    max_len: int,
) -> RouterSettings:
    return RouterSettings(
        model_path=model_path,
        model_name=model_name,
        shard_sockets=shard_sockets,
        conv_template=c.conv_template,
        trust_remote_code=c.trust_remote_code,
        api_keys=c.api_keys,
        host=c.host,
        port=c.port,
        max_concurrency=c.limit_worker_concurrency,
        max_num_batched_tokens=batched_tokens(c, max_len),
        max_num_seqs=c.max_num_seqs,
        enable_prefix_caching=c.enable_prefix_caching,
        quantization=quantization,
        quality_check=c.quality_check,
        use_lookahead=c.use_lookahead,
        num_speculative_tokens=c.num_speculative_tokens,
        max_waiting_requests=c.max_waiting_requests,
        max_waiting_tokens=c.max_waiting_tokens,
        stuck_step_timeout=c.stuck_step_timeout,
        shutdown_timeout=c.shutdown_timeout,
        request_timeout=c.request_timeout,
        queue_timeout=c.queue_timeout,
        scheduler=c.scheduler,
        max_batch_size=c.max_batch_size,
        batch_wait_timeout=c.batch_wait_timeout,
    )
