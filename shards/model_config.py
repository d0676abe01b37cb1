"""A checkpoint's `config.json` mapped once into a frozen `ModelConfig`.

Torch-free so the launcher can validate a model folder before any shard starts.
"""

from __future__ import annotations

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


def _number(raw: dict, name: str, kind, source: str, default=None):
    value = raw.get(name)
    if value is None:
        if default is None:
            raise ModelConfigError(f"{source}: required field {name!r} is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelConfigError(f"{source}: field {name!r} must be a number, got {value!r}")
    return kind(value)


def _qwen_v1(raw: dict, source: str) -> dict:
    """Qwen v1's config.json in the names the rest of this module reads. Its `intermediate_size`
    counts both MLP halves. Dynamic NTK and logn attention scaling act only past `seq_length`
    tokens, so the context is capped there and both stay the identity."""
    out = dict(raw)
    heads = _number(raw, "num_attention_heads", int, source)
    hidden = _number(raw, "hidden_size", int, source)
    out["intermediate_size"] = _number(raw, "intermediate_size", int, source) // 2
    out["head_dim"] = _number(raw, "kv_channels", int, source, hidden // heads)
    out["rms_norm_eps"] = _number(raw, "layer_norm_epsilon", float, source, 1e-6)
    out["rope_theta"] = _number(raw, "rotary_emb_base", float, source, 10000.0)
    out["partial_rotary_factor"] = _number(raw, "rotary_pct", float, source, 1.0)
    context = _number(raw, "max_position_embeddings", int, source, 2048)
    if raw.get("use_dynamic_ntk") or raw.get("use_logn_attn"):
        context = _number(raw, "seq_length", int, source, context)
    out["max_position_embeddings"] = context
    out["tie_word_embeddings"] = False
    for key in ("rope_parameters", "rope_scaling", "num_key_value_heads", "attention_bias"):
        out.pop(key, None)
    return out


def _baichuan(raw: dict, source: str) -> dict:
    """Baichuan's 13B models (both generations) position tokens by ALiBi biases, its 7B models by
    rotary embeddings, and the configs say which by the context key each model's code reads: the
    7B code `max_position_embeddings` (Baichuan2-7B's config carries it beside
    `model_max_length`), the 13B code `model_max_length` alone. Baichuan-7B's own architecture
    name is rotary whatever it carries; a config with neither key falls back to the width (4,096
    rotary, any other ALiBi: vLLM's rule, right for the official sizes only)."""
    out = dict(raw)
    archs = raw.get("architectures") or []
    if archs and archs[0] == "BaiChuanForCausalLM":
        alibi, why = False, "the architecture is Baichuan-7B's"
    elif "max_position_embeddings" in raw:
        alibi, why = False, "the config carries max_position_embeddings, as the 7B models' do"
    elif "model_max_length" in raw:
        alibi, why = True, "the config carries model_max_length only, as the 13B models' do"
    else:
        alibi = raw.get("hidden_size") != 4096
        why = f"the config names no context length; hidden size {raw.get('hidden_size')}"
    out["alibi"] = alibi
    out["_notes"] = [f"Baichuan positions: {'ALiBi' if alibi else 'rotary'} ({why})"]
    out.setdefault("max_position_embeddings", raw.get("model_max_length", 4096))
    return out


def _chatglm(raw: dict, source: str) -> dict:
    """ChatGLM2 / ChatGLM3's config.json in the names the rest of this module reads. Rotary
    covers half of each head's dims, as neighbouring pairs, with base 10,000 x `rope_ratio`
    (ChatGLM3-32K); Q, K and V carry biases, the output projection does not. Variants of the
    block that no released ChatGLM2/3 checkpoint uses are refused by name."""
    for key, wanted in (
        ("rmsnorm", True),
        ("apply_residual_connection_post_layernorm", False),
        ("post_layer_norm", True),
        ("add_qkv_bias", True),
        ("add_bias_linear", False),
        ("original_rope", True),
    ):
        if bool(raw.get(key, wanted)) != wanted:
            raise ModelConfigError(f"{source}: ChatGLM with {key}={raw[key]!r} is not supported")
    out = dict(raw)
    heads = _number(raw, "num_attention_heads", int, source)
    hidden = _number(raw, "hidden_size", int, source)
    out["num_hidden_layers"] = _number(raw, "num_layers", int, source)
    out["vocab_size"] = _number(raw, "padded_vocab_size", int, source)
    out["intermediate_size"] = _number(raw, "ffn_hidden_size", int, source)
    out["head_dim"] = _number(raw, "kv_channels", int, source, hidden // heads)
    if raw.get("multi_query_attention"):
        out["num_key_value_heads"] = _number(raw, "multi_query_group_num", int, source)
    else:
        out["num_key_value_heads"] = heads
    out["rms_norm_eps"] = _number(raw, "layernorm_epsilon", float, source, 1e-5)
    out["max_position_embeddings"] = _number(raw, "seq_length", int, source, 2048)
    out["rope_theta"] = 10000.0 * _number(raw, "rope_ratio", float, source, 1.0)
    out["partial_rotary_factor"] = 0.5
    out["rope_interleaved"] = True
    out["tie_word_embeddings"] = False
    out["attention_bias"] = False  # the output projection's; Q, K and V always have one
    for key in ("rope_parameters", "rope_scaling"):
        out.pop(key, None)
    return out


def _from_dict(raw: dict, generation: dict | None, source: str) -> ModelConfig:
    if raw.get("model_type") == "qwen":
        raw = _qwen_v1(raw, source)
    elif raw.get("model_type") == "baichuan":
        raw = _baichuan(raw, source)
    elif raw.get("model_type") == "chatglm":
        raw = _chatglm(raw, source)

    def need(name: str):
        return _number(raw, name, int, source)

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
        num_key_value_heads=_number(raw, "num_key_value_heads", int, source, heads),
        head_dim=_number(raw, "head_dim", int, source, hidden // heads),
        vocab_size=need("vocab_size"),
        max_position_embeddings=_number(raw, "max_position_embeddings", int, source, 2048),
        rms_norm_eps=_number(raw, "rms_norm_eps", float, source, 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=_number(raw, "partial_rotary_factor", float, source, 1.0),
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
