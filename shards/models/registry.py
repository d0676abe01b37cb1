"""`architectures[0]` from config.json → model class. Torch-free until a class is asked for."""

from __future__ import annotations

import importlib

_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("shards.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("shards.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("shards.models.qwen2", "Qwen2ForCausalLM"),
    "QWenLMHeadModel": ("shards.models.qwen", "QWenLMHeadModel"),
    "BaiChuanForCausalLM": ("shards.models.baichuan", "BaichuanForCausalLM"),
    "BaichuanForCausalLM": ("shards.models.baichuan", "BaichuanForCausalLM"),
    "ChatGLMModel": ("shards.models.chatglm", "ChatGLMForConditionalGeneration"),
    "ChatGLMForConditionalGeneration": ("shards.models.chatglm", "ChatGLMForConditionalGeneration"),
}


class UnknownArchitectureError(ValueError):
    pass


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def check_architecture(arch: str) -> None:
    if arch not in _ARCHITECTURES:
        raise UnknownArchitectureError(
            f"architecture {arch!r} is not supported; supported: "
            + ", ".join(supported_architectures())
        )


def model_class(arch: str) -> type:
    check_architecture(arch)
    module, name = _ARCHITECTURES[arch]
    return getattr(importlib.import_module(module), name)
