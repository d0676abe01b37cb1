"""Our model code, fed through the runner and the paged cache, against transformers' logits."""

from __future__ import annotations

import pytest
import torch

from tests.support.tiny import (
    TINY_CONFIGS,
    build_hf_model,
    hf_logits,
    make_worker,
    our_logits,
    random_tokens,
    save_checkpoint,
    tiny_config,
)

ATOL = 1e-4  # float32, max abs difference
CONFIGS = TINY_CONFIGS
_tokens = random_tokens


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    hf = build_hf_model(CONFIGS[request.param]())
    folder = save_checkpoint(hf, tmp_path_factory.mktemp(request.param))
    return hf, make_worker(folder)


def test_prefill_and_decode_logits_match(pair):
    hf, worker = pair
    tokens = _tokens(45, hf.config.vocab_size)  # prompt spans several 4-token blocks
    ours = our_logits(worker, tokens, prompt_len=37)
    ref = hf_logits(hf, tokens, prompt_len=37)
    assert ref.std() > 0.3, "logits too flat for the comparison to mean anything"
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_chunked_prefill_that_splits_blocks_matches(pair):
    hf, worker = pair
    tokens = _tokens(40, hf.config.vocab_size, seed=1)
    ours = our_logits(worker, tokens, prompt_len=33, chunk=7)
    torch.testing.assert_close(ours, hf_logits(hf, tokens, prompt_len=33), atol=ATOL, rtol=0)


@pytest.mark.parametrize("fmt", ["bin", "sharded-safetensors", "sharded-bin"])
def test_checkpoint_formats_load_identically(fmt, tmp_path):
    hf = build_hf_model(tiny_config("llama"))
    worker = make_worker(save_checkpoint(hf, tmp_path / fmt, fmt))
    tokens = _tokens(20, hf.config.vocab_size, seed=2)
    ours = our_logits(worker, tokens, prompt_len=15)
    torch.testing.assert_close(ours, hf_logits(hf, tokens, prompt_len=15), atol=ATOL, rtol=0)


def test_dynamic_ntk_rope_past_the_original_context(tmp_path):
    cfg = tiny_config(
        "llama", max_position_embeddings=24, rope_scaling={"rope_type": "dynamic", "factor": 2.0}
    )
    hf = build_hf_model(cfg)
    worker = make_worker(save_checkpoint(hf, tmp_path), max_model_len=64)
    tokens = _tokens(34, cfg.vocab_size, seed=3)  # prompt already longer than 24
    ours = our_logits(worker, tokens, prompt_len=30)
    torch.testing.assert_close(ours, hf_logits(hf, tokens, prompt_len=30), atol=ATOL, rtol=0)
