"""Random-weight checkpoints of real model shapes, for benchmarks at the sizes users serve.

Each is written once into the cache (`$SHARDSERVE_CACHE/shapes/<shape>-<dtype>`) as an ordinary
Llama folder: sharded safetensors with an index (or sharded `.bin`), one shard in memory at a
time, with the embedded model's tokenizer. Every shape's vocabulary is that tokenizer's (49,152),
so every id a prompt encodes to is in range (Llama-2's own 32,000 would not be), and a GGUF
converter sees one vocabulary on both sides. Random weights make garbage text: benchmarks on
them ignore EOS and count tokens.

    shardserve bench-engine --shape llama-1b    (every bench-* command takes --shape)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("shardserve.shapes")

VOCAB = 49152  # the embedded tokenizer's
_SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
SHAPES: dict[str, dict] = {
    "smollm2-135m": _SMOLLM2_135M,
    # Llama-3.2-1B (its 128,256-token vocabulary aside)
    "llama-1b": dict(
        _SMOLLM2_135M,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
    ),
    # Llama-2-7B: no GQA, untied head
    "llama-2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}
SHARD_BYTES = 2**30
_FORMAT_VERSION = "1"  # bump when what is written changes
_INIT_STD = 0.02  # as transformers initializes Llama


def config(shape: str, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **SHAPES[shape],
        "vocab_size": VOCAB,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, in the order a Llama checkpoint stores them."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = hidden // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    out = [("model.embed_tokens.weight", (VOCAB, hidden))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    out.append(("model.norm.weight", (hidden,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (VOCAB, hidden)))
    return out


def _shards(cfg: dict, itemsize: int, shard_bytes: int) -> list[list[tuple[str, tuple]]]:
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(cfg):
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_checkpoint(
    folder: Path,
    shape: str,
    dtype: str = "bfloat16",
    fmt: str = "safetensors",
    shard_bytes: int = SHARD_BYTES,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write `shape` with random weights into `folder` (which must not exist), shard by shard."""
    import torch
    from tqdm import tqdm

    from launcher.embedded import ensure_embedded_model

    cfg = config(shape, dtype)
    torch_dtype = getattr(torch, dtype)
    itemsize = torch.empty(0, dtype=torch_dtype).element_size()
    shards = _shards(cfg, itemsize, shard_bytes)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    prefix = "model" if fmt == "safetensors" else "pytorch_model"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    total_bytes = sum(itemsize * torch.Size(s).numel() for shard in shards for _, s in shard)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"writing {shape}",
               disable=not progress)  # fmt: skip
    for i, shard in enumerate(shards):
        name = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
        tensors = {}
        for tensor_name, s in shard:
            if tensor_name.endswith("norm.weight"):
                t = torch.ones(s, dtype=torch_dtype)
            else:
                t = (torch.randn(s, generator=gen) * _INIT_STD).to(torch_dtype)
            tensors[tensor_name] = t
            weight_map[tensor_name] = name
            bar.update(t.numel() * itemsize)
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(tensors, folder / name)
        del tensors
    bar.close()
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / f"{prefix}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    embedded = ensure_embedded_model()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (embedded / f).exists():
            shutil.copy(embedded / f, folder / f)
    return folder


def ensure_shape(shape: str, dtype: str = "bfloat16", fmt: str = "safetensors") -> Path:
    """The cached folder of `shape`, written on first use (into a temporary folder renamed into
    place, so a second benchmark at once never reads a half-written one)."""
    from launcher.embedded import cache_dir

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    root = cache_dir() / "shapes"
    target = root / f"{shape}-{dtype}-{fmt}-v{_FORMAT_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    log.info("writing a random-weight %s checkpoint (%s, %s) to %s", shape, dtype, fmt, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{shape}-", dir=root))
    try:
        write_checkpoint(tmp / "model", shape, dtype, fmt)
        try:
            (tmp / "model").rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def add_model_args(p: argparse.ArgumentParser) -> None:
    """`--model FOLDER` or `--shape NAME` (default: the embedded model)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    group.add_argument(
        "--shape",
        default=None,
        choices=sorted(SHAPES),
        help="a random-weight checkpoint of this shape, written once into the cache",
    )
    p.add_argument("--shape-dtype", default="bfloat16", help="the dtype --shape is stored in")


def model_folder(args: argparse.Namespace) -> str:
    """The folder `add_model_args` asked for."""
    if args.model:
        return args.model
    if args.shape:
        return str(ensure_shape(args.shape, args.shape_dtype))
    from launcher.embedded import ensure_embedded_model

    return str(ensure_embedded_model())
