"""The hand-written CPU GEMVs (layers/quant/gemv.cpp, built by shards/kernels.py) against their
oracles: for int8, torch's integer matmul for the sums (bit for bit, every instruction set this
CPU has), int8.py `_two_pass` for the whole linear, and a model that routes its wide layers
through it (logits within the ifq bound, greedy tokens compiled as eager); for NF4, the matmul
over the dequantized weight, and a model served with it as with the plain path."""

from __future__ import annotations

import pytest
import torch

from layers.quant import int8
from layers.quant.dequant import NF4_EXPAND_MIN_TOKENS
from layers.quant.registry import get_quant_mode
from shards import kernels
from tests.support.tiny import build_hf_model, make_worker, our_logits, save_checkpoint, tiny_config

if not kernels.load():
    pytest.skip("the int8 kernel cannot be built or run here", allow_module_level=True)

ISAS = [isa for isa in kernels.ISA_NAMES if isa <= torch.ops.shardserve_kernels.int8_mm_isa()]
SHAPES = [  # (rows, in, out): odd sizes, a TP half of 1B's down projection, a tied head
    (1, 1, 1),
    (1, 63, 5),
    (2, 577, 13),
    (3, 1000, 33),
    (4, 4096, 96),
    (7, 130, 17),
    (8, 576, 4096),
    (16, 2048, 40),
]


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: kernels.ISA_NAMES[i])
@pytest.mark.parametrize("rows, k, n", SHAPES)
def test_int8_mm_equals_torch_int_mm(isa, rows, k, n):
    gen = torch.Generator().manual_seed(rows * k + n)
    a = torch.randint(-128, 128, (rows, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    ref = a.int() @ b.int().T  # torch._int_mm wants 16 < rows; the same sums, in int32
    assert torch.equal(torch.ops.shardserve_kernels.int8_mm(a, b, isa), ref)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: kernels.ISA_NAMES[i])
@pytest.mark.parametrize("rows, k, n", [s for s in SHAPES if s[0] <= 8])
def test_int8_linear_rounds_and_sums_as_the_two_pass_oracle(isa, rows, k, n):
    gen = torch.Generator().manual_seed(k + n)
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
    x[0, 0] = 0.0  # zeros, and a row of them
    if rows > 2:
        x[1] = 0.0
    w = torch.randn(n, k, generator=gen)
    q, scale = int8.quantize_rows(w, w.abs().amax(dim=1))
    got = torch.ops.shardserve_kernels.int8_linear(x, q, scale, isa)
    ref = int8._two_pass(x, q, scale)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    exact = x @ (q.float() * scale[:, None]).T  # ~15-bit activations: far inside ifq's bound
    assert (got - exact).abs().max() <= 1e-3 * exact.abs().max() + 1e-6


def test_a_build_without_a_compiler_is_refused_by_name(tmp_path):
    with pytest.raises(kernels.KernelBuildError, match="no-such-c"):
        kernels.build(compiler=str(tmp_path / "no-such-c++"))


def test_only_wide_layers_and_kernel_modes_take_it():
    from layers.linear import ColumnParallelLinear

    def layer(k: int, kernels_on: bool):
        lin = ColumnParallelLinear(k, 8, quant=get_quant_mode("ifq", True, False, kernels_on))
        lin.weight.data.normal_()
        lin.finalize_weights()
        return lin

    # inputs in groups of 64 go to the blocks kernel where the CPU has VNNI (test_int8_blocks.py)
    wide = int8.KERNEL_MIN_IN + (32 if torch.ops.shardserve_kernels.int8_mm_isa() >= 2 else 0)
    assert layer(wide, True).int8_kernel
    assert not layer(wide, False).int8_kernel  # torch's paths: the fallback
    assert not layer(int8.KERNEL_MIN_IN - 1, True).int8_kernel


nf4_only = pytest.mark.skipif(
    torch.ops.shardserve_kernels.int8_mm_isa() < 2, reason="the NF4 kernel needs AVX-512"
)


def _nf4_layer(k: int, n: int, kernels_on: bool = True):
    from layers.linear import ColumnParallelLinear

    layer = ColumnParallelLinear(k, n, quant=get_quant_mode("ifq_nf4", True, False, kernels_on))
    layer.weight.data.normal_(generator=torch.Generator().manual_seed(k + n))
    layer.finalize_weights()
    return layer


def _nf4_in_bytes(x: torch.Tensor, layer) -> torch.Tensor:
    """What the kernel computes, in torch: levels rounded to steps of 1/127; each token's inputs
    rounded per group of 64 on the group's absmax / 127 grid, and their rounding errors in
    128ths of a step; exact integer sums per group, scaled by both groups' steps."""
    from layers.quant.dequant import NF4_GROUP, nf4_codes, nf4_scales

    codes = nf4_codes(layer).long()
    w = torch.round(layer.nf4_levels * 127)[codes]  # [N, K] integers
    groups = x.view(x.shape[0], -1, NF4_GROUP)
    step = groups.abs().amax(dim=2).clamp(min=1e-30) / 127  # [M, G]
    u = groups * (1 / step)[..., None]
    hi = torch.round(u)
    lo = torch.round((u - hi) * 128)
    wg = w.view(w.shape[0], -1, NF4_GROUP).double()  # [N, G, 64]
    sums = torch.einsum("mgk,ngk->mng", (128 * hi + lo).double(), wg)  # exact
    scale = nf4_scales(layer).double() / (127 * 128)  # [N, G]
    return (sums * scale[None] * step.double()[:, None]).sum(-1).float()


@nf4_only
@pytest.mark.parametrize("rows, k, n", [(1, 64, 3), (2, 576, 960), (8, 2048, 77), (9, 128, 5),
                                        (64, 1024, 33), (3, 8192, 16), (130, 192, 7),
                                        (5, 64, 32), (13, 128, 48)])  # fmt: skip
def test_nf4_kernel_computes_in_bytes_close_to_the_dequantized_matmul(rows, k, n):
    layer = _nf4_layer(k, n)
    assert layer.nf4_kernel
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    ops = torch.ops.shardserve_kernels
    padded = ops.nf4_blocks_linear(x, layer.nf4_blocks, layer.nf4_block_scales, layer.nf4_levels)
    got = padded[:, :n]  # outputs padded to blocks of 16 rows give zeros past n
    assert torch.equal(padded[:, n:], torch.zeros(rows, padded.shape[1] - n))
    if rows < NF4_EXPAND_MIN_TOKENS:  # what the layer runs (more: tests/layers/test_expand.py)
        assert torch.equal(layer.quant.apply(layer, x, None), got)
    # its own arithmetic, written independently: equal but for float summation order
    mine = _nf4_in_bytes(x, layer)
    torch.testing.assert_close(got, mine, rtol=1e-4, atol=1e-5 * mine.abs().max().item())
    # and what rounding the levels (and, far less, the activations) costs against the exact
    # weights: ~0.6 %
    ref = x @ layer.quant.dequantized(layer).T
    assert (got - ref).norm() <= 0.012 * ref.norm()


@nf4_only
def test_nf4_without_kernels_takes_the_plain_path():
    layer = _nf4_layer(128, 8, kernels_on=False)
    assert not layer.nf4_kernel
    x = torch.randn(5, 128)
    torch.testing.assert_close(layer.quant.apply(layer, x, None),
                               x @ layer.quant.dequantized(layer).T)  # fmt: skip


@nf4_only
def test_a_model_in_nf4_decodes_through_the_kernel_as_through_the_plain_path(tiny_nf4_folder):
    tokens = [5, 17, 99, 3, 41, 150, 8, 77, 12, 60]
    worker = make_worker(tiny_nf4_folder, quantization="ifq_nf4")
    assert any(getattr(m, "nf4_kernel", False) for m in worker.model.modules())
    got = our_logits(worker, tokens, 6)
    plain = make_worker(tiny_nf4_folder, quantization="ifq_nf4", fast_kernels=False)
    ref = our_logits(plain, tokens, 6)
    # the kernel's int8 levels and two-pass activations, through every layer: measured 1.7 %
    assert (got - ref).norm() <= 0.03 * ref.norm()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


@pytest.fixture(scope="module")
def tiny_nf4_folder(tmp_path_factory):
    hf = build_hf_model(tiny_config("llama"))
    return save_checkpoint(hf, tmp_path_factory.mktemp("nf4") / "model")


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
    """Down projections of 2,080 inputs: the layers the kernel takes (not in groups of 64, which
    the blocks kernel would take)."""
    hf = build_hf_model(tiny_config("llama", intermediate_size=int8.KERNEL_MIN_IN + 32))
    return save_checkpoint(hf, tmp_path_factory.mktemp("wide") / "model")


def test_a_model_through_the_kernel_stays_within_ifq_bounds(wide_folder):
    tokens = [5, 17, 99, 3, 41, 150, 8, 77, 12, 60]
    worker = make_worker(wide_folder, quantization="ifq")
    assert any(getattr(m, "int8_kernel", False) for m in worker.model.modules())
    got = our_logits(worker, tokens, 6)
    oracle = our_logits(make_worker(wide_folder, quantization="ifq", fast_kernels=False), tokens, 6)
    assert (got - oracle).abs().max() <= 2e-3 * oracle.abs().max()


def test_compiled_steps_through_the_kernel_decode_as_eager_ones(wide_folder):
    tokens = [5, 17, 99, 3, 41, 150, 8, 77, 12, 60, 33, 2]
    eager = our_logits(make_worker(wide_folder, quantization="ifq"), tokens, 4)
    compiled = make_worker(wide_folder, quantization="ifq", cpu_compile=True)
    assert compiled.runner.compiled is not None
    got = our_logits(compiled, tokens, 4)
    assert torch.equal(got.argmax(-1), eager.argmax(-1))
    # the narrow layers differ: compiled steps multiply them with float activations
    assert (got - eager).abs().max() <= 2e-3 * eager.abs().max()
