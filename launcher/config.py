"""The one `Config`: every flag of the vendor image's tables, with its environment variable and
default. argparse is generated from the fields, so no flag exists without its env var.

Precedence: command line, then environment, then `ti_model_config.json` in the model folder
(model_id, conv_template_name), then the default. Children receive the serialized Config.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from launcher.flags import ConfigError, opt, parse_bool, parse_bytes, parse_optional_int
from launcher.validate import validate

GiB = 2**30
DEFAULT_MODEL_PATH = "/data/model"


@dataclass(frozen=True)
class Config:
    # -- model ---------------------------------------------------------------------------------
    model_path: str = opt(
        ["--model-path", "--model"],
        "MODEL_PATH",
        DEFAULT_MODEL_PATH,
        "model folder (config.json, weights, tokenizer); when the default "
        "folder does not exist the embedded default model is served",
    )
    model_id: str | None = opt(
        ["--served-model-name"],
        "MODEL_ID",
        None,
        "model name reported by the API (ti_model_config.json model_id)",
        file_key="model_id",
    )
    conv_template: str | None = opt(
        ["--conv-template"],
        "CONV_TEMPLATE",
        None,
        "chat template name (ti_model_config.json conv_template_name)",
        file_key="conv_template_name",
    )
    trust_remote_code: bool = opt(
        "--trust-remote-code",
        "TRUST_REMOTE_CODE",
        False,
        "allow a checkpoint's own tokenizer class (never its model code)",
        parse=parse_bool,
        is_flag=True,
    )
    dtype: str | None = opt(
        "--dtype",
        "DTYPE",
        None,
        "compute dtype: auto, float16, bfloat16, float32 (default: float16 on GPU; on CPU bfloat16 "
        "where it has bfloat16 dot products and weights are not quantized, else float32)",
        choices=["auto", "float16", "bfloat16", "float32"],
    )
    max_model_len: int | None = opt(
        "--max-model-len",
        "MAX_MODEL_LEN",
        None,
        "context length (default: the model's)",
        parse=parse_optional_int,
    )
    quantization: str = opt(
        "--quantization",
        "QUANTIZATION",
        "none",
        "weight quantization",
        choices=["none", "ifq", "ifq_nf4", "fp8", "smoothquant", "auto"],
    )
    quality_check: bool = opt(
        "--quality-check",
        "QUALITY_CHECK",
        False,
        "log held-out perplexity at start-up, as served (dtype, quantization)",
        parse=parse_bool,
        is_flag=True,
    )
    seed: int | None = opt(
        "--seed", "SEED", None, "random seed for sampling", parse=parse_optional_int
    )
    # -- parallelism ---------------------------------------------------------------------------
    num_gpus: int | None = opt(
        ["--num-gpus", "--tensor-parallel-size"],
        "TP",
        None,
        "tensor parallel size (default: the visible GPUs, 1 on CPU)",
        parse=parse_optional_int,
    )
    worker_num: int = opt(
        "--worker-num",
        "WORKER_NUM",
        1,
        "independent worker groups (data-parallel replicas)",
        parse=int,
    )
    nnodes: int = opt("--nnodes", "NNODES", 1, "machines one worker group spans", parse=int)
    node_rank: int = opt(
        "--node-rank", "NODE_RANK", 0, "this machine's index; node 0 runs the router", parse=int
    )
    master_addr: str = opt(
        "--master-addr", "MASTER_ADDR", "127.0.0.1", "node 0's address for the rendezvous"
    )
    master_port: int | None = opt(
        "--master-port",
        "MASTER_PORT",
        None,
        "node 0's rendezvous port (default: a free port; required with --nnodes > 1)",
        parse=parse_optional_int,
    )
    collective_timeout: float = opt(
        "--collective-timeout",
        "COLLECTIVE_TIMEOUT",
        120.0,
        "seconds before a rendezvous or a collective with a dead or hung rank fails",
        parse=float,
    )
    limit_worker_concurrency: int = opt(
        "--limit-worker-concurrency",
        "MAX_CONCURRENCY",
        128,
        "requests running per worker; the rest queue",
        parse=int,
    )
    # -- scheduling ----------------------------------------------------------------------------
    max_num_batched_tokens: int | None = opt(
        "--max-num-batched-tokens",
        "MAX_NUM_BATCHED_TOKENS",
        None,
        "tokens per step (default: max(context, 2048))",
        parse=parse_optional_int,
    )
    max_num_seqs: int = opt("--max-num-seqs", "MAX_NUM_SEQS", 256, "sequences per step", parse=int)
    block_size: int = opt("--block-size", "BLOCK_SIZE", 16, "tokens per KV cache block", parse=int)
    kv_cache_memory: int = opt(
        "--kv-cache-memory",
        "KV_CACHE_MEMORY",
        2 * GiB,
        "KV cache size on CPU, e.g. 2GiB",
        parse=parse_bytes,
    )
    gpu_memory_utilization: float = opt(
        ["--gpu-memory-utilization", "--gpu_memory_utilization"],
        "GPU_MEMORY_UTILIZATION",
        0.9,
        "share of GPU memory for weights, activations and KV cache",
        parse=float,
    )
    enable_prefix_caching: bool = opt(
        "--enable-prefix-caching",
        "ENABLE_PREFIX_CACHING",
        True,
        "share the KV blocks of repeated prompt prefixes",
        parse=parse_bool,
        is_flag=True,
    )
    enforce_eager: bool = opt(
        "--enforce-eager",
        "ENFORCE_EAGER",
        True,
        "no CUDA graphs (spec default 1); 0 captures decode steps",
        parse=parse_bool,
        is_flag=True,
    )
    cpu_compile: bool = opt(
        "--cpu-compile",
        "CPU_COMPILE",
        True,
        "compile decode steps on CPU at start-up (torch.compile; a minute the first time, "
        "seconds once cached); 0 runs them eagerly",
        parse=parse_bool,
        is_flag=True,
    )
    use_v2_block_manager: bool = opt(
        "--use-v2-block-manager",
        None,
        False,
        "accepted for vLLM compatibility (always paged)",
        parse=parse_bool,
        is_flag=True,
    )
    # -- lookahead -----------------------------------------------------------------------------
    use_lookahead: bool = opt(
        "--use-lookahead",
        "USE_LOOKAHEAD",
        False,
        "lookahead parallel decoding (0, 1, true, false)",
        parse=parse_bool,
        is_flag=True,
    )
    num_speculative_tokens: int = opt(
        "--num-speculative-tokens",
        "NUM_SPECULATIVE_TOKENS",
        8,
        "draft length of one lookahead",
        parse=int,
    )
    # -- server --------------------------------------------------------------------------------
    host: str = opt("--host", "HOST", "0.0.0.0", "address to listen on")
    port: int = opt("--port", "PORT", 8501, "port to listen on", parse=int)
    api_keys: tuple[str, ...] = opt(
        "--api-keys",
        "OPENAI_API_KEYS",
        (),
        "comma-separated bearer tokens; enables auth",
        parse=lambda s: tuple(k.strip() for k in s.split(",") if k.strip()),
    )
    max_waiting_requests: int = opt(
        "--max-waiting-requests",
        "MAX_WAITING_REQUESTS",
        512,
        "requests waiting per worker group (for a slot or their first step) before new ones "
        "get 429; 0: no bound",
        parse=int,
    )
    max_waiting_tokens: int = opt(
        "--max-waiting-tokens",
        "MAX_WAITING_TOKENS",
        262144,
        "prompt tokens waiting per worker group before new requests get 429; 0: no bound",
        parse=int,
    )
    request_timeout: float = opt(
        "--request-timeout",
        "REQUEST_TIMEOUT",
        0.0,
        "seconds from arrival after which a request ends with finish_reason timeout; 0: none",
        parse=float,
    )
    queue_timeout: float = opt(
        "--queue-timeout",
        "QUEUE_TIMEOUT",
        0.0,
        "seconds a request may wait for its first step before 429 (code queue_timeout); 0: none",
        parse=float,
    )
    shutdown_timeout: float = opt(
        "--shutdown-timeout",
        "SHUTDOWN_TIMEOUT",
        30.0,
        "on SIGTERM, seconds in-flight requests may take to finish (new ones get 503); a "
        "second signal stops at once",
        parse=float,
    )
    log_format: str = opt(
        "--log-format",
        "LOG_FORMAT",
        "text",
        "text, or json: one JSON object per log line, with request ids and counts as fields",
        choices=["text", "json"],
    )
    stuck_step_timeout: float = opt(
        "--stuck-step-timeout",
        "STUCK_STEP_TIMEOUT",
        60.0,
        "seconds one step may run before /health/live and /health/ready answer 503",
        parse=float,
    )
    # -- the DeepSpeed image's dynamic batching ----------------------------------------------------
    ds_dtype: str = opt(
        "--ds-dtype",
        "DS_DTYPE",
        "float16",
        "DeepSpeed-image dtype: float16, bfloat16, int8",
        choices=["float16", "bfloat16", "int8"],
    )
    max_batch_size: int = opt(
        "--max-batch-size",
        "MAX_BATCH_SIZE",
        16,
        "DeepSpeed-image: requests per dynamic batch",
        parse=int,
    )
    scheduler: str = opt(
        "--scheduler",
        "SCHEDULER",
        "continuous",
        "continuous batching, or the DeepSpeed image's dynamic batching (MAX_BATCH_SIZE requests "
        "or BATCH_WAIT_TIMEOUT, then the batch runs to completion; DS_DTYPE sets the dtype)",
        choices=["continuous", "dynamic-batching"],
    )
    batch_wait_timeout: float = opt(
        "--batch-wait-timeout",
        "BATCH_WAIT_TIMEOUT",
        0.1,
        "DeepSpeed-image: seconds to gather a batch",
        parse=float,
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Config:
        d = dict(d)
        d["api_keys"] = tuple(d.get("api_keys", ()))
        return Config(**d)


def _fields():
    return [f for f in dataclasses.fields(Config) if f.metadata.get("flags")]


def build_parser(prog: str = "shardserve serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a model with an OpenAI-compatible API.",
        argument_default=argparse.SUPPRESS,
    )
    for f in _fields():
        m = f.metadata
        env = f"env {m['env']}" if m["env"] else "no env var"
        default = (
            "auto"
            if f.default is None
            else (",".join(f.default) if isinstance(f.default, tuple) else f.default)
        )
        help_text = f"{m['help']} [{env}; default: {default}]"
        kwargs: dict[str, Any] = dict(dest=f.name, help=help_text)
        if m["is_flag"]:
            kwargs.update(nargs="?", const="1", metavar="BOOL")
        if m["choices"]:
            kwargs["choices"] = m["choices"]
        parser.add_argument(*m["flags"], **kwargs)
    return parser


def load_config(
    argv: list[str] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Resolve every field: CLI, then env, then ti_model_config.json, then default."""
    environ = dict(os.environ if environ is None else environ)
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    for f in _fields():
        m = f.metadata
        raw, source = None, None
        if f.name in args:
            raw, source = args[f.name], m["flags"][0]
        elif m["env"] and environ.get(m["env"], "") != "":
            raw, source = environ[m["env"]], m["env"]
        if source is None:
            continue
        try:
            value = m["parse"](raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from e
        if m["choices"] and value not in m["choices"]:
            raise ConfigError(f"{source}: {value!r} is not one of {', '.join(m['choices'])}")
        values[f.name] = value
    values.update(_from_model_file(values.get("model_path", DEFAULT_MODEL_PATH), values))
    config = Config(**values)
    validate(config)
    return config


def _from_model_file(model_path: str, given: dict) -> dict:
    """model_id / conv_template from ti_model_config.json, where not given otherwise."""
    import json

    path = os.path.join(model_path, "ti_model_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    out = {}
    for f in _fields():
        key = f.metadata["file_key"]
        if key and f.name not in given and data.get(key):
            out[f.name] = str(data[key])
    return out
