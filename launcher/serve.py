"""`shardserve serve`: resolve the config and model, start the shard and the router, watch them."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import orjson

from launcher.config import Config, ConfigError, load_config
from launcher.model_resolution import ResolvedModel, resolve_model
from launcher.processes import Supervisor, spawn, stop_all
from router.settings import SETTINGS_ENV, RouterSettings
from router.templates import KNOWN_NAMES
from shards.wire import ShardSpec, to_dict

log = logging.getLogger("shardserve.launcher")


def _refuse_unsupported(c: Config) -> None:
    """Flags whose features are not built yet: accepted by the parser, refused here."""
    if (c.num_gpus or 1) > 1:
        raise ConfigError(f"--num-gpus {c.num_gpus}: tensor parallelism is not supported yet")
    if c.worker_num > 1:
        raise ConfigError(f"--worker-num {c.worker_num}: worker groups are not supported yet")
    if c.quantization != "none":
        raise ConfigError(f"--quantization {c.quantization}: quantization is not supported yet")
    if c.use_lookahead:
        raise ConfigError("--use-lookahead: lookahead decoding is not supported yet")
    if not c.enforce_eager:
        if _device() == "cuda":
            raise ConfigError("--enforce-eager 0: CUDA graph capture is not supported yet")
        log.info("--enforce-eager 0 has no effect on CPU: there are no CUDA graphs to capture")


def _max_model_len(c: Config, model: ResolvedModel) -> int:
    native = model.config.max_position_embeddings
    if c.max_model_len is None:
        return native
    if c.max_model_len > native and model.config.rope_scaling is None:
        raise ConfigError(
            f"--max-model-len {c.max_model_len} exceeds the model's context of {native} tokens"
        )
    return c.max_model_len


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def plan_processes(
    c: Config, model: ResolvedModel, socket_dir: str
) -> tuple[ShardSpec, RouterSettings]:
    if c.conv_template is not None and c.conv_template not in KNOWN_NAMES:
        raise ConfigError(
            f"CONV_TEMPLATE {c.conv_template!r} is unknown; known: {', '.join(KNOWN_NAMES)}"
        )
    max_len = _max_model_len(c, model)
    batched = c.max_num_batched_tokens or max(max_len, 2048)
    spec = ShardSpec(
        model_path=model.path,
        device=_device(),
        dtype=c.dtype,
        block_size=c.block_size,
        kv_cache_memory=c.kv_cache_memory,
        gpu_memory_utilization=c.gpu_memory_utilization,
        max_model_len=max_len,
        max_num_batched_tokens=batched,
        seed=c.seed,
        quantization=c.quantization,
    )
    settings = RouterSettings(
        model_path=model.path,
        model_name=model.name,
        shard_sockets=(os.path.join(socket_dir, "shard-0.sock"),),
        conv_template=c.conv_template,
        trust_remote_code=c.trust_remote_code,
        api_keys=c.api_keys,
        host=c.host,
        port=c.port,
        max_concurrency=c.limit_worker_concurrency,
        max_num_batched_tokens=batched,
        max_num_seqs=c.max_num_seqs,
        enable_prefix_caching=c.enable_prefix_caching,
    )
    return spec, settings


def serve(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
        _refuse_unsupported(config)
        model = resolve_model(config)
        socket_dir = tempfile.mkdtemp(prefix="shardserve-")
        spec, settings = plan_processes(config, model, socket_dir)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    log.info(
        "serving %s from %s on %s:%d (%s)",
        model.name,
        model.path,
        config.host,
        config.port,
        spec.device,
    )
    children = []
    try:
        children.append(
            spawn(
                "shard 0",
                "shards.server",
                [
                    "--socket",
                    settings.shard_sockets[0],
                    "--spec",
                    orjson.dumps(to_dict(spec)).decode(),
                ],
            )
        )
        # Through the environment, not argv: the settings carry the API keys, and argv is
        # visible to every user of the machine.
        children.append(
            spawn(
                "router",
                "router.server",
                [],
                env={
                    SETTINGS_ENV: orjson.dumps(settings.to_dict()).decode(),
                },
            )
        )
        return Supervisor(children).run()
    finally:
        stop_all(children)
        shutil.rmtree(socket_dir, ignore_errors=True)
