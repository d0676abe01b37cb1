"""`shardserve serve`: resolve the config and model, start the shard and the router, watch them."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import orjson

from launcher.config import Config, ConfigError, load_config
from launcher.groups import group_specs, shard_argv, socket_path
from launcher.model_resolution import ResolvedModel, resolve_model
from launcher.plan import max_model_len, router_settings, shard_spec
from launcher.processes import Child, Supervisor, spawn, stop_all
from layers.parallel import ShardingError
from layers.quant.smoothquant import SMOOTHQUANT_FILE
from router.http.templates import KNOWN_NAMES
from router.settings import SETTINGS_ENV, RouterSettings
from shards import logs
from shards.checkpoint import CheckpointError, safetensors_metadata
from shards.model_config import check_tensor_parallel
from shards.wire import ShardSpec

log = logging.getLogger("shardserve.launcher")


def _note_no_effect(c: Config) -> None:
    """Flags accepted everywhere that do nothing on this machine: said once in the log."""
    if not c.enforce_eager and _device()[0] != "cuda":
        log.info("--enforce-eager 0 has no effect on CPU: there are no CUDA graphs to capture")


def resolve_quantization(mode: str, model_path: str, device: str) -> str:
    """`auto` by the spec's rules: a smoothquant checkpoint in the folder → smoothquant;
    hardware that cannot run quantized kernels → none; otherwise ifq."""
    if mode != "auto":
        return mode
    if os.path.exists(os.path.join(model_path, SMOOTHQUANT_FILE)):
        log.info("QUANTIZATION=auto: smoothquant (%s is in the model folder)", SMOOTHQUANT_FILE)
        return "smoothquant"
    from layers.quant.int8 import int8_matmul_available

    if device == "cpu" and not int8_matmul_available():
        log.info("QUANTIZATION=auto: none (this CPU build has no oneDNN int8 kernels)")
        return "none"
    log.info("QUANTIZATION=auto: ifq (no %s in the model folder)", SMOOTHQUANT_FILE)
    return "ifq"


def check_smoothquant_file(model_path: str, cfg) -> None:
    """The SmoothQuant file exists, is ours, and was made for this model's shape."""
    from layers.quant.smoothquant import FORMAT, FORMAT_VERSION

    path = os.path.join(model_path, SMOOTHQUANT_FILE)
    hint = "make it with `shardserve quantize --model-path <the float checkpoint>`"
    if not os.path.isfile(path):
        raise ConfigError(f"QUANTIZATION=smoothquant needs {path}; {hint}")
    try:
        meta = safetensors_metadata(path)
    except CheckpointError as e:
        raise ConfigError(f"QUANTIZATION=smoothquant: {e}; {hint}") from e
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: not a {FORMAT} v{FORMAT_VERSION} file (format {meta.get('format')!r}, "
            f"version {meta.get('version')!r}); {hint}"
        )
    expected = {
        "architecture": cfg.architecture,
        "hidden_size": str(cfg.hidden_size),
        "num_hidden_layers": str(cfg.num_hidden_layers),
        "vocab_size": str(cfg.vocab_size),
    }
    wrong = [
        f"{k} {meta.get(k)} (config.json: {v})" for k, v in expected.items() if meta.get(k) != v
    ]
    if wrong:
        raise ConfigError(f"{path} was made for another model: {', '.join(wrong)}; {hint}")
    log.info(
        "smoothquant: %s, calibrated on %s tokens",
        SMOOTHQUANT_FILE,
        meta.get("calibration_tokens", "?"),
    )


def tensor_parallel_size(c: Config, model: ResolvedModel, device: str, gpus: int) -> int:
    """TP from the flags (default: this node's GPUs split over the worker groups, times the
    nodes; one rank per node on CPU), checked against the model and the GPUs."""
    if c.nnodes > 1 and c.worker_num > 1:
        raise ConfigError(
            f"--nnodes {c.nnodes} with --worker-num {c.worker_num}: a multi-node server runs "
            "one worker group"
        )
    per_node_default = max(1, gpus // c.worker_num) if device == "cuda" else 1
    tp = c.num_gpus or per_node_default * c.nnodes
    if tp % c.nnodes:
        raise ConfigError(f"--num-gpus {tp} does not split evenly over --nnodes {c.nnodes}")
    if device == "cuda" and (tp // c.nnodes) * c.worker_num > gpus:
        raise ConfigError(
            f"--num-gpus {tp} x --worker-num {c.worker_num} needs "
            f"{(tp // c.nnodes) * c.worker_num} GPUs on this node; {gpus} visible"
        )
    try:
        check_tensor_parallel(model.config, tp)
    except ShardingError as e:
        raise ConfigError(f"--num-gpus {tp}: {e}") from e
    if c.quantization == "ifq_nf4":
        _check_nf4_groups(model.config, tp)
    return tp


def _check_nf4_groups(cfg, tp: int) -> None:
    """ifq_nf4 quantizes groups of 64 inputs: every rank's input width must hold whole groups."""
    from layers.quant.dequant import NF4_GROUP

    widths = {
        "hidden size": cfg.hidden_size,
        "attention output (heads x head_dim / TP)": cfg.num_attention_heads * cfg.head_dim // tp,
        "intermediate size / TP": cfg.intermediate_size // tp,
    }
    bad = [f"{name} {n}" for name, n in widths.items() if n % NF4_GROUP]
    if bad:
        raise ConfigError(
            f"QUANTIZATION=ifq_nf4 needs input widths divisible by its group of {NF4_GROUP}: "
            f"{', '.join(bad)}"
        )


def _device() -> tuple[str, int]:
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.device_count()
    return "cpu", 0


@dataclass
class ProcessPlan:
    groups: list[list[ShardSpec]]  # per worker group, the ranks that run on this node
    settings: RouterSettings | None  # None on nodes other than 0: they run shards only


def ds_image_settings(c: Config, device: str) -> Config:
    """Dynamic batching is the DeepSpeed image's mode, whose DS_DTYPE sets the precision:
    int8 is our ifq (in the compute dtype), float16 / bfloat16 the dtype. DTYPE and QUANTIZATION
    given as well win. On CPU a DS_DTYPE of float16 / bfloat16 leaves the CPU's default dtype
    (bfloat16 only where the CPU multiplies it natively, shards/dtypes.py; logged)."""
    if c.scheduler != "dynamic-batching":
        return c
    changes: dict = {}
    if c.ds_dtype == "int8":
        if c.quantization == "none":
            changes["quantization"] = "ifq"
    elif c.dtype is None and device != "cpu":
        changes["dtype"] = c.ds_dtype
    elif c.dtype is None:
        log.info("DS_DTYPE=%s on CPU: the CPU default dtype applies", c.ds_dtype)
    if changes:
        log.info("dynamic batching, DS_DTYPE=%s: %s", c.ds_dtype, changes)
    return dataclasses.replace(c, **changes)


def plan_processes(c: Config, model: ResolvedModel, socket_dir: str) -> ProcessPlan:
    if c.conv_template is not None and c.conv_template not in KNOWN_NAMES:
        raise ConfigError(
            f"CONV_TEMPLATE {c.conv_template!r} is unknown; known: {', '.join(KNOWN_NAMES)}"
        )
    device, gpus = _device()
    c = ds_image_settings(c, device)
    quantization = resolve_quantization(c.quantization, model.path, device)
    if quantization == "smoothquant":
        check_smoothquant_file(model.path, model.config)
    tp = tensor_parallel_size(c, model, device, gpus)
    max_len = max_model_len(c, model.config)
    base = shard_spec(c, model.path, quantization, max_len, device=device)
    groups = [
        group_specs(
            base,
            tp,
            g,
            c.worker_num,
            c.master_addr,
            c.master_port + g if c.master_port else None,
            c.nnodes,
            c.node_rank,
        )
        for g in range(c.worker_num)
    ]
    if c.node_rank > 0:
        return ProcessPlan(groups, None)
    sockets = tuple(socket_path(socket_dir, g) for g in range(c.worker_num))
    settings = router_settings(c, model.path, model.name, sockets, quantization, max_len)
    return ProcessPlan(groups, settings)


def _spawn_group(specs: list[ShardSpec], socket_dir: str) -> list[Child]:
    return [
        spawn(
            f"shard {s.rank}/{s.world_size} of worker group {s.group_index}",
            "shards.server",
            shard_argv(s, socket_path(socket_dir, s.group_index)),
            group=s.group_index,
        )
        for s in specs
    ]


def serve(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
        logs.configure(config.log_format)  # the processes started below inherit it
        _note_no_effect(config)
        model = resolve_model(config)
        socket_dir = tempfile.mkdtemp(prefix="shardserve-")
        plan = plan_processes(config, model, socket_dir)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    first = plan.groups[0][0]  # every node runs at least one rank of every group
    if plan.settings is None:
        log.info(
            "node %d of %d: shards of %s for the group at %s:%s",
            config.node_rank,
            config.nnodes,
            model.name,
            config.master_addr,
            config.master_port,
        )
    else:
        log.info(
            "serving %s from %s on %s:%d (%s, %d worker group(s) of TP %d over %d node(s))",
            model.name,
            model.path,
            config.host,
            config.port,
            first.device.split(":")[0],
            config.worker_num,
            first.world_size,
            config.nnodes,
        )
    children: list[Child] = []
    try:
        for specs in plan.groups:
            children += _spawn_group(specs, socket_dir)
        if plan.settings is not None:
            # Through the environment, not argv: the settings carry the API keys, and argv is
            # visible to every user of the machine.
            children.append(
                spawn(
                    "router",
                    "router.http.server",
                    [],
                    env={SETTINGS_ENV: orjson.dumps(plan.settings.to_dict()).decode()},
                )
            )
        router = next((c for c in children if c.name == "router"), None)
        return Supervisor(
            children,
            num_groups=config.worker_num,
            drain=router,
            shutdown_timeout=config.shutdown_timeout,
        ).run()
    finally:
        stop_all(children)
        shutil.rmtree(socket_dir, ignore_errors=True)
