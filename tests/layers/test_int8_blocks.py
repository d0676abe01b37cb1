"""`ifq`'s int8 rows in blocks of 16 (layers/quant/blocks.cpp: `int8_blocks_linear`): the kernel
against its arithmetic written independently in torch (each token's inputs rounded per group of
64 twice over, exact integer sums) and against the dequantized matmul; which layers take it;
and a model served through it within the bound of the plain path, compiled steps as eager."""

from __future__ import annotations

import pytest
import torch

from layers.quant import int8
from layers.quant.registry import get_quant_mode
from shards import kernels
from tests.support.tiny import build_hf_model, make_worker, our_logits, save_checkpoint, tiny_config

if not kernels.load() or torch.ops.shardserve_kernels.int8_mm_isa() < 2:
    pytest.skip("the int8 blocks kernel needs AVX-512 VNNI", allow_module_level=True)

ops = torch.ops.shardserve_kernels


def _layer(k: int, n: int, kernels_on: bool = True):
    from layers.linear import ColumnParallelLinear

    layer = ColumnParallelLinear(k, n, quant=get_quant_mode("ifq", True, False, kernels_on))
    layer.weight.data.normal_(generator=torch.Generator().manual_seed(k + n))
    layer.finalize_weights()
    return layer


def _in_bytes(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in torch: per token and group of 64 inputs, a step of |x|max /
    127; the inputs' codes (hi) and their rounding errors in 128ths of a step (lo); integer sums
    with the int8 rows, exact in float64; the row scale last."""
    groups = x.view(x.shape[0], -1, 64)
    step = groups.abs().amax(dim=2).clamp(min=1e-30) / 127  # [M, G]
    u = groups * (1 / step)[..., None]
    hi = torch.round(u)
    lo = torch.round((u - hi) * 128)
    qg = q.view(q.shape[0], -1, 64).double()  # [N, G, 64]
    sums = torch.einsum("mgk,ngk->mng", (128 * hi + lo).double(), qg)
    return ((sums * (step.double() / 128)[:, None]).sum(-1) * scale.double()).float()


# odd outputs (padded to 16), 1/3/16 rows and more, a TP half of the 1B shape's down projection
SHAPES = [(1, 64, 3), (3, 576, 960), (16, 2048, 77), (1, 128, 16), (40, 1024, 48), (130, 192, 7),
          (5, 4096, 1024)]  # fmt: skip


@pytest.mark.parametrize("rows, k, n", SHAPES)
def test_the_kernel_sums_as_its_arithmetic_and_stays_near_the_dequantized_matmul(rows, k, n):
    layer = _layer(k, n)
    assert layer.int8_blocks is not None and layer.qweight is None
    q = layer.quant.int8_values(layer)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3
    x[0, :64] = 0.0  # a group of zeros
    padded = ops.int8_blocks_linear(x, layer.int8_blocks, layer.block_scale)
    got = padded[:, :n]
    assert torch.equal(padded[:, n:], torch.zeros(rows, padded.shape[1] - n))  # scale-0 rows
    assert torch.equal(layer.quant.apply(layer, x, None), got)  # what the layer runs
    mine = _in_bytes(x, q, layer.weight_scale)
    torch.testing.assert_close(got, mine, rtol=1e-4, atol=1e-5 * mine.abs().max().item())
    # ~15-bit activations against the exact float matmul over the same int8 weights
    exact = x @ layer.quant.dequantized(layer).T
    assert (got - exact).norm() <= 2e-4 * exact.norm()


def test_blocks_hold_the_rows_exactly():
    q = torch.randint(-127, 128, (32, 192), dtype=torch.int8)
    assert torch.equal(int8.from_blocks(int8.to_blocks(q), 32), q)


def test_which_layers_take_blocks():
    assert _layer(576, 8).int8_blocks is not None  # outputs padded to 16
    assert _layer(100, 8).int8_blocks is None  # inputs not in groups of 64
    assert _layer(576, 8, kernels_on=False).int8_blocks is None  # torch's paths: the fallback


def test_a_tied_head_keeps_plain_rows_for_the_embeddings_lookups(tmp_path):
    folder = save_checkpoint(build_hf_model(tiny_config("llama")), tmp_path / "model")
    worker = make_worker(folder, quantization="ifq")
    head = worker.model.lm_head
    assert head.quantized.int8_blocks is None and head.quantized.qweight is not None
    assert any(getattr(m, "int8_blocks", None) is not None for m in worker.model.modules())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_checkpoint(build_hf_model(tiny_config("llama")), tmp_path_factory.mktemp("b"))


def test_a_model_through_blocks_stays_within_the_plain_paths_bound(folder):
    tokens = [5, 17, 99, 3, 41, 150, 8, 77, 12, 60]
    got = our_logits(make_worker(folder, quantization="ifq"), tokens, 6)
    oracle = our_logits(make_worker(folder, quantization="ifq", fast_kernels=False), tokens, 6)
    assert (got - oracle).abs().max() <= 2e-3 * oracle.abs().max()


def test_compiled_steps_through_blocks_compute_as_eager_ones(folder):
    tokens = [5, 17, 99, 3, 41, 150, 8, 77, 12, 60, 33, 2]
    eager = our_logits(make_worker(folder, quantization="ifq"), tokens, 4)
    compiled = make_worker(folder, quantization="ifq", cpu_compile=True)
    assert compiled.runner.compiled is not None
    got = our_logits(compiled, tokens, 4)
    assert torch.equal(got.argmax(-1), eager.argmax(-1))
    assert (got - eager).abs().max() <= 1e-4 * eager.abs().max()
