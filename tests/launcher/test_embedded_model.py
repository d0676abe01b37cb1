"""The embedded default model (SmolLM2-135M-Instruct, converted from its GGUF) generates exactly
what transformers generates from the converted folder, greedy, float32."""

from __future__ import annotations

import pytest
import torch

from launcher.llm import LLM
from router.params import GenerationParams
from shards.wire import SamplingParams

CHATS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three fruits that are red.",
    "How do I reverse a list in Python?",
]


@pytest.fixture(scope="module")
def llm():
    return LLM(max_num_batched_tokens=512, dtype="float32")


def test_converted_folder_is_a_plain_checkpoint(llm):
    import json
    from pathlib import Path

    folder = Path(llm.model_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (folder / "tokenizer.json").is_file()
    assert llm.tokenizer.chat_template


def test_greedy_chat_matches_transformers(llm):
    from transformers import AutoModelForCausalLM

    prompts = [llm.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
    params = GenerationParams(max_tokens=128, sampling=SamplingParams(temperature=0.0))
    ours = llm.generate(prompts, params)  # all five batched together
    ref_model = AutoModelForCausalLM.from_pretrained(llm.model_path, dtype=torch.float32).eval()
    for ids, out in zip(prompts, ours):
        with torch.inference_mode():
            ref = ref_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=128,
                do_sample=False,
            )[0, len(ids) :].tolist()
        assert out.token_ids == ref, f"diverged for prompt {ids[-12:]}"
