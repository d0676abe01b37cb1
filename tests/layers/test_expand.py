"""Quantized rows expanded to bfloat16 for the GEMMs of many tokens (layers/quant/expand.py and
expand.cpp): each expanded value equals the dequantized float32 weight cast to bfloat16, bit for
bit; tiles add up to the whole matmul; layers take the path from their threshold on (256 tokens
for layers in blocks of 16 rows, below which their kernels are faster; 33 for `ifq` rows kept
plain), eagerly only, and stay within bfloat16's rounding of the float matmul; a model's prompt
through it keeps its greedy tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers.quant import expand
from layers.quant.dequant import NF4_EXPAND_MIN_TOKENS
from layers.quant.int8 import INT8_EXPAND_MIN_TOKENS
from layers.quant.registry import get_quant_mode
from shards import kernels
from tests.support.tiny import build_hf_model, make_worker, our_logits, save_checkpoint, tiny_config

if not (kernels.load() and expand.expand_available()):
    pytest.skip("needs AVX-512 with bfloat16 dot products", allow_module_level=True)

ops = torch.ops.shardserve_kernels

# the fewest tokens each mode expands, its rows in blocks (inputs a multiple of 64)
FROM = {"ifq": INT8_EXPAND_MIN_TOKENS, "ifq_nf4": NF4_EXPAND_MIN_TOKENS}


def _layer(mode: str, k: int, n: int):
    from layers.linear import ColumnParallelLinear

    layer = ColumnParallelLinear(k, n, quant=get_quant_mode(mode, True, False, True))
    layer.weight.data.normal_(generator=torch.Generator().manual_seed(k * 7 + n))
    layer.finalize_weights()
    return layer


@pytest.mark.parametrize("k, n", [(64, 1), (128, 3), (576, 960), (2048, 17), (128, 48)])
def test_nf4_expand_is_the_dequantized_weight_in_bfloat16(k, n):
    layer = _layer("ifq_nf4", k, n)
    want = layer.quant.dequantized(layer).bfloat16()
    rows = layer.nf4_blocks.shape[0] * 16  # n padded to blocks of 16 rows
    assert rows - 16 < n <= rows
    out = torch.full((rows, k), float("nan"), dtype=torch.bfloat16)
    ops.nf4_blocks_expand(layer.nf4_blocks, layer.nf4_block_scales, layer.nf4_levels, out)
    assert torch.equal(out[:n], want)
    assert torch.equal(out[n:], torch.zeros(rows - n, k, dtype=torch.bfloat16))  # scale 0


@pytest.mark.parametrize("k, n", [(1, 1), (15, 2), (17, 3), (576, 960), (1000, 33)])
def test_int8_expand_is_the_dequantized_weight_in_bfloat16(k, n):
    gen = torch.Generator().manual_seed(k + n)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scale = torch.rand(n, generator=gen) * 0.01
    out = torch.empty(n, k, dtype=torch.bfloat16)
    ops.int8_expand(q, scale, out)  # the tail past a multiple of 16 too
    assert torch.equal(out, (q.float() * scale[:, None]).bfloat16())


def test_expand_refuses_an_output_of_the_wrong_dtype_or_shape():
    q = torch.zeros(4, 32, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.int8_expand(q, torch.ones(4), torch.empty(4, 32))
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.int8_expand(q, torch.ones(4), torch.empty(4, 16, dtype=torch.bfloat16))


def _bf16_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.bfloat16(), w.bfloat16()).float()


@pytest.mark.parametrize(
    "mode, k, n, rows",
    [
        ("ifq", 128, 100, INT8_EXPAND_MIN_TOKENS),
        ("ifq", 100, 100, expand.EXPAND_MIN_TOKENS),  # inputs not in groups of 64: plain rows
        ("ifq_nf4", 128, 100, NF4_EXPAND_MIN_TOKENS),
        ("ifq_nf4", 128, 96, NF4_EXPAND_MIN_TOKENS),
    ],
)
def test_tiles_add_up_to_the_whole_matmul(mode, k, n, rows, monkeypatch):
    layer = _layer(mode, k, n)  # in rows of 16 where they divide the outputs
    assert (getattr(layer, "int8_blocks", None) is not None) == (mode == "ifq" and k % 64 == 0)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    whole = layer.quant.apply(layer, x, None)
    # 32 rows a tile: three whole tiles and a part
    monkeypatch.setattr(expand, "EXPAND_TILE_BYTES", 32 * 2 * k)
    tiled = layer.quant.apply(layer, x, None)
    assert torch.equal(tiled, whole)
    assert torch.equal(whole, _bf16_reference(x, layer.quant.dequantized(layer)))


@pytest.mark.parametrize("mode", ["ifq", "ifq_nf4"])
def test_layers_expand_past_the_compiled_row_counts_within_bfloat16_rounding(mode):
    layer = _layer(mode, 2048, 64)
    assert layer.expand_gemm
    w = layer.quant.dequantized(layer)
    gen = torch.Generator().manual_seed(2)
    for rows in (FROM[mode], FROM[mode] + 31):
        x = torch.randn(rows, 2048, generator=gen)
        got = layer.quant.apply(layer, x, None)
        assert torch.equal(got, _bf16_reference(x, w))
        exact = x.double() @ w.double().T
        # inputs, weights and outputs each rounded to bfloat16's 8 bits: measured ~0.3 %
        assert (got.double() - exact).norm() <= 0.01 * exact.norm()
    fewer = torch.randn(FROM[mode] - 1, 2048, generator=gen)
    assert not torch.equal(layer.quant.apply(layer, fewer, None), _bf16_reference(fewer, w))


def test_a_prompt_through_expanded_tiles_keeps_the_greedy_tokens(tmp_path, monkeypatch):
    # the tiny model's context is too short for 256 tokens: layers expand from 33 tokens here
    monkeypatch.setattr("layers.quant.dequant.NF4_EXPAND_MIN_TOKENS", expand.EXPAND_MIN_TOKENS)
    monkeypatch.setattr("layers.quant.int8.INT8_EXPAND_MIN_TOKENS", expand.EXPAND_MIN_TOKENS)
    folder = save_checkpoint(build_hf_model(tiny_config("llama")), tmp_path / "model")
    tokens = [(i * 37 + 5) % 160 for i in range(expand.EXPAND_MIN_TOKENS + 7)]
    for mode in ("ifq", "ifq_nf4"):
        worker = make_worker(folder, quantization=mode)
        assert any(getattr(m, "expand_gemm", False) for m in worker.model.modules())
        got = our_logits(worker, tokens, len(tokens))  # one prompt of 40 tokens
        plain = make_worker(folder, quantization=mode, fast_kernels=False)
        ref = our_logits(plain, tokens, len(tokens))
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
        # bfloat16 rounding through every layer of a random model: measured 0.8 %
        assert (got - ref).norm() <= 0.03 * ref.norm()
