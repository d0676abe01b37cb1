"""A checkpoint's `config.json` mapped once into a frozen `ModelConfig`.

Torch-free so the launcher can validate a model folder before any shard starts.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path


class ModelConfigError(ValueError):
    """A checkpoint folder whose config cannot be served; the message names the file and field."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    partial_rotary_factor: float
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    checkpoint_dtype: str | None
    rope_interleaved: bool = False  # rotary pairs are neighbouring dims (GLM), not halves
    alibi: bool = False  # ALiBi attention biases instead of rotary (Baichuan 13B)
    notes: tuple[str, ...] = ()  # choices read off the config, for the start-up log
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _sliding_windows(raw: dict, num_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    if raw.get("model_type") in ("qwen2", "qwen2_moe") and not raw.get("use_sliding_window", False):
        window = None
    if window is None:
        return (None,) * num_layers
    layer_types = raw.get("layer_types")
    if layer_types:
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    if raw.get("model_type") == "qwen2":
        first = int(raw.get("max_window_layers", num_layers))
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    return (int(window),) * num_layers


def _rope(raw: dict) -> tuple[float, dict | None]:
    # transformers 5 writes `rope_parameters` (theta inside); older files `rope_theta` and
    # `rope_scaling`.
    params = raw.get("rope_parameters") or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling") or params
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return float(theta), (None if kind == "default" else scaling)


def model_config_from_dict(
    raw: dict, generation: dict | None = None, source: str = "config.json"
) -> ModelConfig:
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{source}: expected a JSON object")
    try:
        return _from_dict(raw, generation, source)
    except (TypeError, ValueError) as e:
        if isinstance(e, ModelConfigError):
            raise
        raise ModelConfigError(f"{source}: {e}") from e


def number(raw: dict, name: str, kind, source: str, default=None):
    value = raw.get(name)
    if value is None:
        if default is None:
            raise ModelConfigError(f"{source}: required field {name!r} is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelConfigError(f"{source}: field {name!r} must be a number, got {value!r}")
    return kind(value)


# model_type -> the module (beside its family's model code, torch-free) whose `common_fields`
# maps a config written in the family's own names into the names `_from_dict` reads.
_FAMILY_FIELDS = {
    "qwen": "shards.models.qwen_config",
    "baichuan": "shards.models.baichuan_config",
    "chatglm": "shards.models.chatglm_config",
}


def _from_dict(raw: dict, generation: dict | None, source: str) -> ModelConfig:
    family = _FAMILY_FIELDS.get(raw.get("model_type"))
    if family is not None:
        raw = importlib.import_module(family).common_fields(raw, source)

    def need(name: str):
        return number(raw, name, int, source)

    archs = raw.get("architectures") or []
    if not archs:
        raise ModelConfigError(f"{source}: field 'architectures' is missing or empty")
    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    layers = need("num_hidden_layers")
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelConfigError(f"{source}: hidden_act {act!r} is not supported (silu)")
    theta, scaling = _rope(raw)
    eos = _ids(raw.get("eos_token_id")) + _ids((generation or {}).get("eos_token_id"))
    return ModelConfig(
        architecture=archs[0],
        model_type=str(raw.get("model_type", "")),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=number(raw, "num_key_value_heads", int, source, heads),
        head_dim=number(raw, "head_dim", int, source, hidden // heads),
        vocab_size=need("vocab_size"),
        max_position_embeddings=number(raw, "max_position_embeddings", int, source, 2048),
        rms_norm_eps=number(raw, "rms_norm_eps", float, source, 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=number(raw, "partial_rotary_factor", float, source, 1.0),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        sliding_windows=_sliding_windows(raw, layers),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        bos_token_id=raw.get("bos_token_id"),
        checkpoint_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        rope_interleaved=bool(raw.get("rope_interleaved", False)),
        alibi=raw.get("model_type") == "baichuan" and bool(raw.get("alibi")),
        notes=tuple(raw.get("_notes", ())),
        extra=raw,
    )


def load_model_config(folder: str | Path) -> ModelConfig:
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"{folder}: no config.json (is this a model folder?)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path}: not valid JSON ({e})") from e
    gen_path = folder / "generation_config.json"
    generation = None
    if gen_path.is_file():
        try:
            generation = json.loads(gen_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{gen_path}: not valid JSON ({e})") from e
    return model_config_from_dict(raw, generation, source=str(path))


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Refuse, before any process starts, a TP size the model's shapes cannot be split by."""
    from layers.parallel import ShardingError

    problems = []
    if cfg.num_attention_heads % tp:
        problems.append(f"{cfg.num_attention_heads} attention heads")
    kv = cfg.num_key_value_heads
    if kv % tp and tp % kv:
        problems.append(f"{kv} KV heads (neither divides the other)")
    if cfg.intermediate_size % tp:
        problems.append(f"intermediate size {cfg.intermediate_size}")
    if problems:
        raise ShardingError(
            f"tensor parallel size {tp} does not divide {', '.join(problems)} of {cfg.architecture}"
        )
