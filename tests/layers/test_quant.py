"""Quantization modes on single layers (bounds stated per test), TP=2 vs TP=1 with quantized
weights, `auto`'s choice, and the quality of `ifq` on the embedded model."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from layers.linear import ColumnParallelLinear, RowParallelLinear
from layers.quant.base import onednn_available
from layers.quant.int8 import (
    COMPILED_TWO_PASS,
    QMAX,
    Int8WeightOnly,
    int8_matmul_available,
    quantize_rows,
)
from layers.quant.registry import QuantConfigError, get_quant_mode
from tests.support.tiny import build_hf_model, make_worker, our_logits, save_checkpoint, tiny_config
from tests.support.tp import tp_logits

needs_int8_gemm = pytest.mark.skipif(
    not int8_matmul_available(), reason="no oneDNN int8 GEMM in this torch"
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(quant, weight: torch.Tensor, bias: torch.Tensor | None = None):
    layer = ColumnParallelLinear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                 quant=quant)  # fmt: skip
    layer.weight.data.copy_(weight)
    if bias is not None:
        layer.bias.data.copy_(bias)
    layer.finalize_weights()
    return layer


def test_quantize_rows_rounds_to_the_nearest_step():
    w = torch.randn(64, 96, generator=_gen(0)) * torch.rand(64, 1, generator=_gen(1)) * 3
    q, scale = quantize_rows(w, w.abs().amax(1))
    assert q.dtype == torch.int8 and int(q.abs().max()) == QMAX
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6)


def test_ifq_reference_layer_is_within_the_rounding_bound():
    # Bound: each weight moves by at most scale/2, so |y - y_q| <= |x| @ (scale / 2) per output.
    w = torch.randn(48, 80, generator=_gen(2))
    b = torch.randn(48, generator=_gen(3))
    x = torch.randn(7, 80, generator=_gen(4))
    layer = _linear(Int8WeightOnly(fast=False), w, b)
    assert layer.weight is None and layer.qweight is not None  # the float copy is gone
    got = layer(x)
    bound = x.abs() @ (layer.weight_scale / 2)[None, :].expand(80, -1) + 1e-5
    assert torch.all((got - F.linear(x, w, b)).abs() <= bound)


@needs_int8_gemm
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_ifq_fast_path_agrees_with_the_reference(rows, compiled):
    # The fast path rounds each token twice onto its int8 grid: what is left of an activation is
    # at most half a step of the second grid, |x|max / 127 / 254, times the row's |W| sum. The
    # outlier channel (40x) sets the grid, so small entries lose the most. 300 rows take the
    # eager path's 128-row slices, and the compiled path's symbolic row count.
    w = torch.randn(192, 576, generator=_gen(5))
    x = torch.randn(rows, 576, generator=_gen(6)) * torch.rand(rows, 1, generator=_gen(7)) * 10
    x[:, 3] *= 40  # an outlier channel, as LLM activations have
    fast = _linear(Int8WeightOnly(fast=True, compiled=compiled), w)
    ref = _linear(Int8WeightOnly(fast=False), w)
    assert fast.int8_gemm
    assert COMPILED_TWO_PASS.failed is None
    assert torch.equal(fast.quant.dequantized(fast), ref.quant.dequantized(ref))
    y_fast, y_ref = fast(x), ref(x)
    w_sum = ref.quant.dequantized(ref).abs().sum(1)
    bound = x.abs().amax(1, keepdim=True) / (QMAX * 2 * QMAX) * w_sum + 1e-4  # + float32 sums
    assert torch.all((y_fast - y_ref).abs() <= bound)
    assert not torch.equal(y_fast, y_ref)  # the activations really were rounded


@needs_int8_gemm
def test_a_failed_int8_compile_falls_back_to_eager(monkeypatch):
    w = torch.randn(64, 128, generator=_gen(8))
    x = torch.randn(5, 128, generator=_gen(9))
    eager = _linear(Int8WeightOnly(fast=True), w)(x)

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(COMPILED_TWO_PASS, "fn", broken)
    monkeypatch.setattr(COMPILED_TWO_PASS, "failed", None)
    compiled = _linear(Int8WeightOnly(fast=True, compiled=True), w)
    assert torch.equal(compiled(x), eager)
    assert "no C++ compiler" in COMPILED_TWO_PASS.failed
    assert torch.equal(compiled(x), eager)  # and from then on, without trying again


def test_row_parallel_scales_are_row_maxima_over_127():
    # One rank: the scale is the row's max / 127. That every TP size gets the same scales (the
    # maxima all-reduced over ranks) is test_ifq_tp2_equals_tp1's job, over gloo.
    w = torch.randn(16, 32, generator=_gen(8))
    layer = RowParallelLinear(32, 16, quant=Int8WeightOnly(fast=False))
    layer.weight.data.copy_(w)
    layer.finalize_weights()
    assert torch.equal(layer.weight_scale, (w.abs().amax(1) / QMAX))


def test_unknown_and_unresolved_modes_are_clear_errors():
    with pytest.raises(QuantConfigError, match="unknown quantization 'int3'"):
        get_quant_mode("int3")
    with pytest.raises(QuantConfigError, match="'auto' names no mode by itself"):
        get_quant_mode("auto")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    cfg = tiny_config("llama", num_attention_heads=8, num_key_value_heads=4, hidden_size=128,
                      intermediate_size=256)  # fmt: skip
    return save_checkpoint(build_hf_model(cfg), tmp_path_factory.mktemp("q") / "model")


def _tokens(n: int) -> list[int]:
    rng = random.Random(3)
    return [rng.randrange(3, 160) for _ in range(n)]


def test_ifq_tp2_equals_tp1(tiny_folder):
    # The reference path over gloo: both TP sizes hold the same int8 values and scales (row
    # scales are all-reduced maxima), so logits agree as closely as unquantized TP does.
    tokens = _tokens(24)
    ref = our_logits(make_worker(tiny_folder, quantization="ifq", fast_kernels=False), tokens, 16)
    got = tp_logits(tiny_folder, 2, tokens, 16, quantization="ifq", fast_kernels=False)
    assert (got - ref).abs().max().item() <= 1e-4


def test_ifq_logits_stay_close_to_float32(tiny_folder):
    tokens = _tokens(24)
    ref = our_logits(make_worker(tiny_folder), tokens, 16)
    for fast in (False, True):
        got = our_logits(
            make_worker(tiny_folder, quantization="ifq", fast_kernels=fast), tokens, 16
        )
        # int8 weights (±0.4% of each row's max): logits move by a few hundredths at most here
        assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


def test_ifq_weight_memory_is_about_a_quarter_of_float32(tiny_folder):
    full = make_worker(tiny_folder).weight_bytes
    quant = make_worker(tiny_folder, quantization="ifq").weight_bytes
    # linears shrink 4x; the float32 embedding (vocab 160 x 128) and norms stay
    assert quant < 0.45 * full


@torch.inference_mode()
def test_a_tied_int8_head_serves_the_embedding_lookups_too(tmp_path):
    cfg = tiny_config("llama", tie_word_embeddings=True)
    folder = save_checkpoint(build_hf_model(cfg), tmp_path)
    float_worker = make_worker(folder)
    worker = make_worker(folder, quantization="ifq")
    model = worker.model
    embedding, head = model.model.embed_tokens, model.lm_head.quantized
    assert embedding.int8_rows is not None and embedding.weight.numel() == 0  # float rows gone
    ids = torch.tensor([0, 5, 17, cfg.vocab_size - 1])
    rows = head.quant.dequantized(head)[ids]
    assert torch.equal(embedding(ids), rows)
    # every row within half an int8 step of the float row
    exact = float_worker.model.model.embed_tokens(ids)
    assert torch.all((rows - exact).abs() <= head.weight_scale[ids, None] / 2 + 1e-7)
    # linears, head and embedding in int8: a little over a quarter of float32 (scales, norms)
    assert worker.weight_bytes < 0.3 * float_worker.weight_bytes


def test_ifq_perplexity_on_the_embedded_model():
    from launcher.embedded import ensure_embedded_model
    from launcher.llm import LLM
    from router.http.quality import eval_tokens, perplexity

    folder = str(ensure_embedded_model())
    ppl = {}
    for mode in ("none", "ifq"):
        with LLM(
            folder, quantization=mode, kv_cache_memory=2**28, max_model_len=2048, dtype="float32"
        ) as llm:
            ppl[mode] = perplexity(llm, eval_tokens(llm.tokenizer, 1024))
    # BENCHMARKS.md: +0.1 %; the guard is looser so machine noise in float sums cannot flake it
    assert ppl["ifq"] <= ppl["none"] * 1.02


# -- fp8 and ifq_nf4 (dequantize-then-matmul) --------------------------------------------------


def test_fp8_weights_round_to_e4m3_precision():
    # e4m3 keeps 3 mantissa bits: a relative step of 2^-3, so rounding moves a weight by at most
    # |w| / 16; below the smallest normal (2^-6 of the scale) steps are 2^-9 of the scale.
    w = torch.randn(32, 64, generator=_gen(10)) * torch.rand(32, 1, generator=_gen(11)) * 4
    layer = _linear(get_quant_mode("fp8"), w)
    scale = layer.weight_scale[:, None]
    err = (layer.quant.dequantized(layer) - w).abs()
    assert torch.all(err <= w.abs() / 16 + scale * 2**-10 + 1e-7)
    x = torch.randn(5, 64, generator=_gen(12))
    torch.testing.assert_close(layer(x), x @ layer.quant.dequantized(layer).T, rtol=0, atol=1e-4)


def test_fp8_scale_search_rounds_each_row_no_worse_than_its_absmax_scale():
    from layers.quant.dequant import FP8_MAX

    w = torch.randn(64, 96, generator=_gen(14)) * torch.rand(64, 1, generator=_gen(15)) * 2
    layer = _linear(get_quant_mode("fp8"), w)
    absmax_scale = w.abs().amax(1, keepdim=True) / FP8_MAX
    plain = (w / absmax_scale).to(torch.float8_e4m3fn).float() * absmax_scale
    searched = layer.quant.dequantized(layer)
    err_plain = (plain - w).square().sum(1)
    err_searched = (searched - w).square().sum(1)
    assert torch.all(err_searched <= err_plain * (1 + 1e-6))
    assert err_searched.sum() < err_plain.sum() * 0.9  # the search moves most rows
    # the scale only grows (factors in [1, 2)): no row's largest weight is clipped
    ratio = layer.weight_scale[:, None] / absmax_scale
    assert torch.all((ratio >= 1 - 1e-6) & (ratio < 2))


@pytest.mark.parametrize("mode", ["fp8", "ifq_nf4"])
def test_memory_modes_tied_head_reads_the_embedding_table_without_a_packed_copy(tmp_path, mode):
    cfg = tiny_config("llama", tie_word_embeddings=True, hidden_size=128, intermediate_size=256)
    folder = save_checkpoint(build_hf_model(cfg), tmp_path / "tied")
    model = make_worker(folder, quantization=mode).model
    head, embed = model.lm_head, model.model.embed_tokens
    assert head.tied and head.packed_weight is None and head.weight is embed.weight
    if onednn_available():  # float32 itself serves its head from a oneDNN-packed copy
        assert make_worker(folder, quantization="none").model.lm_head.packed_weight is not None


def test_nf4_codes_pack_two_per_byte_and_stay_within_half_a_level_gap():
    from layers.quant.dequant import NF4_GROUP, NF4_LEVELS

    w = torch.randn(8, 4 * NF4_GROUP, generator=_gen(13))
    layer = _linear(get_quant_mode("ifq_nf4"), w)
    # rows of packed codes, or (the CPU kernel's layout) blocks of 16 rows, these 8 padded
    stored, rows = (layer.nf4_packed, 8) if layer.nf4_blocks is None else (layer.nf4_blocks, 16)
    assert stored.dtype == torch.uint8 and stored.numel() == rows * 4 * NF4_GROUP // 2
    deq = layer.quant.dequantized(layer)
    group_max = w.view(8, 4, NF4_GROUP).abs().amax(2, keepdim=True)
    half_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2
    err = (deq - w).view(8, 4, NF4_GROUP).abs()
    assert torch.all(err <= group_max * half_gap + 1e-6)
    # each group's largest weight is exactly representable (a level of ±1 times the scale)
    torch.testing.assert_close(deq.view(8, 4, NF4_GROUP).abs().amax(2, keepdim=True), group_max)


def test_nf4_group_that_does_not_divide_is_a_clear_error():
    from layers.quant.dequant import GroupSizeError

    with pytest.raises(GroupSizeError, match="groups of 64 inputs do not divide this rank's 96"):
        ColumnParallelLinear(96, 32, quant=get_quant_mode("ifq_nf4"))


# NF4 through the CPU kernel rounds activations to 128ths of a step: a last-bit difference in
# the sums before it (each rank's partial sums, added in another order) can move one input by
# such a step, which shows in the logits' fourth digit. Measured: 5e-4 of their largest.
@pytest.mark.parametrize(("mode", "bound"), [("fp8", 1e-4), ("ifq_nf4", 2e-3)])
def test_dequant_modes_tp2_equal_tp1(tiny_folder, mode, bound):
    tokens = _tokens(24)
    ref = our_logits(make_worker(tiny_folder, quantization=mode), tokens, 16)
    got = tp_logits(tiny_folder, 2, tokens, 16, quantization=mode)
    assert (got - ref).abs().max().item() <= bound * max(1.0, ref.abs().max().item())


# Measured on these 1,024 tokens: fp8 +2.2 % (+1.85 % on BENCHMARKS.md's 2,048), ifq_nf4 +25 %
# (over the issue's +6 %: this model's weights were themselves rounded to Q4_1). The guards
# leave room for float noise and catch a broken mode, or fp8's scale search undone (+4.2 %).
@pytest.mark.parametrize("mode,bound", [("fp8", 1.03), ("ifq_nf4", 1.30)])
def test_dequant_modes_perplexity_on_the_embedded_model(mode, bound):
    from launcher.embedded import ensure_embedded_model
    from launcher.llm import LLM
    from router.http.quality import eval_tokens, perplexity

    folder = str(ensure_embedded_model())
    ppl = {}
    for m in ("none", mode):
        with LLM(
            folder, quantization=m, kv_cache_memory=2**28, max_model_len=2048, dtype="float32"
        ) as llm:
            ppl[m] = perplexity(llm, eval_tokens(llm.tokenizer, 1024))
    assert ppl[mode] <= ppl["none"] * bound


# bitsandbytes' NF4 table, written out here rather than imported from layers/quant
_NF4_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
              0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]  # fmt: skip


def _nf4_rounded(w: torch.Tensor) -> torch.Tensor:
    """Absmax NF4 rounding in groups of 64 inputs: each weight to the nearest level."""
    levels = torch.tensor(_NF4_TABLE, dtype=torch.float64)
    g = w.double().reshape(w.shape[0], -1, 64)
    absmax = g.abs().amax(dim=-1, keepdim=True)
    nearest = (g / absmax).unsqueeze(-1).sub(levels).abs().argmin(dim=-1)
    return (levels[nearest] * absmax).reshape(w.shape).to(w.dtype)


def test_nf4_perplexity_matches_an_independent_nf4_rounding():
    """The embedded model's weights were rounded to Q4_1 before we got them, so NF4 costs it
    +25 % whatever the kernel; what ifq_nf4 must match is NF4 rounding itself: every decoder
    linear rounded here, scored with transformers in float32 on the same tokens."""
    from transformers import AutoModelForCausalLM

    from launcher.embedded import ensure_embedded_model
    from launcher.llm import LLM
    from router.http.quality import eval_tokens, perplexity

    folder = str(ensure_embedded_model())
    with LLM(folder, quantization="ifq_nf4", kv_cache_memory=2**28, max_model_len=2048,
             dtype="float32") as llm:  # fmt: skip
        tokens = eval_tokens(llm.tokenizer, 1024)
        ours = perplexity(llm, tokens)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            for lin in layer.modules():
                if isinstance(lin, torch.nn.Linear):
                    lin.weight.copy_(_nf4_rounded(lin.weight))
        loss = hf(torch.tensor([tokens]), labels=torch.tensor([tokens])).loss
    reference = math.exp(loss.item())
    # measured: +0.5 % (the kernel's int8 levels +0.65 %, the int8 LM head -0.15 %)
    assert abs(ours / reference - 1) <= 0.01, (ours, reference)
