"""Tiny random-weight checkpoints built with transformers, and drivers that read logits from
both transformers and our runner for the same token sequence."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from shards.wire import ScheduledSeq, StepPlan

KIB = 1024


def random_tokens(n: int, vocab: int = 160, seed: int = 0) -> list[int]:
    """n token ids past the special ones (0-2), reproducibly."""
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


# The tiny configurations models are checked on against transformers (eager and compiled).
def _tiny_configs():
    return {
        "llama-gqa": lambda: tiny_config("llama"),
        "llama-tied": lambda: tiny_config("llama", tie_word_embeddings=True),
        "llama-mha-bias": lambda: tiny_config(
            "llama", num_key_value_heads=4, attention_bias=True, mlp_bias=True
        ),
        "llama3-rope": lambda: tiny_config(
            "llama",
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        "llama-linear-rope": lambda: tiny_config(
            "llama", rope_scaling={"rope_type": "linear", "factor": 2.0}
        ),
        "llama-partial-rotary": lambda: tiny_config("llama", partial_rotary_factor=0.5),
        "mistral-window": lambda: tiny_config("mistral", sliding_window=8),
        "qwen2": lambda: tiny_config("qwen2"),
    }


def tiny_config(family: str = "llama", **overrides):
    import transformers

    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=160,
        max_position_embeddings=256,
        initializer_range=0.1,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "glm":
        base["pad_token_id"] = 0  # its default (151,329) lies outside a tiny vocabulary
    base.update(overrides)
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "glm": transformers.GlmConfig,
    }[family]
    return cls(**base)


def build_hf_model(config, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    model = {
        "LlamaConfig": transformers.LlamaForCausalLM,
        "MistralConfig": transformers.MistralForCausalLM,
        "Qwen2Config": transformers.Qwen2ForCausalLM,
        "GlmConfig": transformers.GlmForCausalLM,
    }[type(config).__name__](config)
    with torch.no_grad():
        # Norm weights and biases start at 1 and 0: randomize them so a wrong load shows.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def save_checkpoint(model, folder: Path, fmt: str = "safetensors") -> Path:
    """fmt: safetensors | bin | sharded-safetensors | sharded-bin."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    ext = "safetensors" if fmt.endswith("safetensors") else "bin"

    def write(part: dict, name: str) -> None:
        if ext == "safetensors":
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)

    stem = "model" if ext == "safetensors" else "pytorch_model"
    if not fmt.startswith("sharded"):
        write(state, f"{stem}.{ext}")
        return folder
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves):
        file = f"{stem}-{i + 1:05d}-of-00002.{ext}"
        write({k: state[k] for k in part}, file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / f"{stem}.{ext}.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return folder


def make_worker(
    folder, block_size: int = 4, kv_kib: int = 512, max_model_len: int | None = None, **kw
):
    from launcher.plan import config_with, shard_spec
    from shards.worker import Worker

    kw.setdefault("dtype", "float32")  # compared with transformers in float32
    kw.setdefault("cpu_compile", False)  # compiled decode steps where a test asks for them
    c = config_with(block_size=block_size, kv_cache_memory=kv_kib * KIB)
    spec = shard_spec(c, str(folder), "none", max_model_len, progress=False)
    return Worker(dataclasses.replace(spec, **kw))  # ShardSpec's own field names


@torch.inference_mode()
def our_logits(
    worker, tokens: list[int], prompt_len: int, chunk: int | None = None, seq_id: int = 1
):
    """Teacher-forced logits from our runner: prefill `tokens[:prompt_len]` in chunks of
    `chunk`, then decode the rest one token at a time (compiled where the worker compiles
    decode steps). Returns [len(tokens), vocab]."""
    runner = worker.runner
    bs = runner.block_size
    blocks = list(range(1, -(-len(tokens) // bs) + 1))
    chunk = chunk or prompt_len
    rows = []
    pos = 0
    step = 0
    while pos < len(tokens):
        n = min(chunk, prompt_len - pos) if pos < prompt_len else 1
        step += 1
        plan = StepPlan(step, [ScheduledSeq(seq_id, tokens[pos : pos + n], pos, blocks, False)])
        logits = runner.compiled.run(plan.seqs) if runner.compiled is not None else None
        if logits is None:
            hidden, _ = runner.forward(plan.seqs)
            logits = worker.model.compute_logits(hidden)
        rows.append(logits.float())
        pos += n
    return torch.cat(rows)


@torch.inference_mode()
def hf_logits(model, tokens: list[int], prompt_len: int) -> torch.Tensor:
    """transformers' logits for the prompt, then one cached decode step per remaining token."""
    ids = torch.tensor([tokens])
    out = model(ids[:, :prompt_len], use_cache=True)
    rows = [out.logits[0].float()]
    # transformers renamed past_key_values to cache (5.2x); the GPU machine has an older one
    key = "cache" if getattr(out, "cache", None) is not None else "past_key_values"
    for t in range(prompt_len, len(tokens)):
        out = model(ids[:, t : t + 1], use_cache=True, **{key: out[key]})
        rows.append(out.logits[0].float())
    return torch.cat(rows)


TINY_CONFIGS = _tiny_configs()
