"""ChatGLM2 / ChatGLM3 (`ChatGLMModel`) from its official checkpoint layout, without remote code:
a tiny random checkpoint written in that layout from a transformers `Glm` model with the same
weights (transformers' port of the GLM block) gives transformers' logits, and TP=2 gives TP=1's.
"""

from __future__ import annotations

import json

import pytest
import torch

from shards.model_config import ModelConfigError, load_model_config
from tests.support.families import ROPE_RATIO, as_chatglm, chatglm_config
from tests.support.tiny import (
    build_hf_model,
    hf_logits,
    make_worker,
    our_logits,
    random_tokens,
    tiny_config,
)
from tests.support.tp import tp_logits


def _glm(num_kv_heads: int = 2):
    cfg = tiny_config(
        "glm",
        num_key_value_heads=num_kv_heads,
        head_dim=16,
        attention_bias=True,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * ROPE_RATIO,
            "partial_rotary_factor": 0.5,
        },
    )
    return build_hf_model(cfg)


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    hf = _glm()
    return hf, as_chatglm(hf, tmp_path_factory.mktemp("chatglm") / "chatglm")


def _tokens(n: int) -> list[int]:
    return random_tokens(n, seed=11)


def test_config_fields_map(glm):
    _, folder = glm
    cfg = load_model_config(folder)
    assert cfg.architecture == "ChatGLMModel"
    assert (cfg.num_hidden_layers, cfg.intermediate_size, cfg.head_dim) == (2, 128, 16)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.rotary_dim == 8 and cfg.rope_interleaved and cfg.rope_theta == 20000.0
    assert not cfg.tie_word_embeddings and not cfg.attention_bias


def test_logits_match_transformers_glm_with_the_same_weights(glm):
    hf, folder = glm
    tokens = _tokens(24)
    ref = hf_logits(hf, tokens, 14)
    assert ref.std() > 0.3
    got = our_logits(make_worker(folder), tokens, 14, chunk=5)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_without_multi_query_every_head_has_its_own_kv(tmp_path):
    hf = _glm(num_kv_heads=4)
    folder = as_chatglm(hf, tmp_path / "mha")
    assert load_model_config(folder).num_key_value_heads == 4
    tokens = _tokens(18)
    torch.testing.assert_close(
        our_logits(make_worker(folder), tokens, 10), hf_logits(hf, tokens, 10), atol=1e-4, rtol=0
    )


def test_tp2_splits_the_fused_tensors_by_proportion(glm):
    _, folder = glm
    tokens = _tokens(16)
    ref = our_logits(make_worker(folder), tokens, 10)
    got = tp_logits(folder, 2, tokens, 10)
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "field,value", [("rmsnorm", False), ("apply_residual_connection_post_layernorm", True)]
)
def test_block_variants_no_release_uses_are_refused_by_name(tmp_path, field, value):
    folder = tmp_path / "odd"
    folder.mkdir()
    raw = chatglm_config(_glm().config, **{field: value})
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError, match=field):
        load_model_config(folder)
