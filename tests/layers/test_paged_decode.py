"""Decode attention over the paged cache: the hand-written kernel (layers/attention/
paged_decode.cpp) against the torch formulation it replaces, in float32 and bfloat16, for GQA
groups, head sizes and block sizes; the layers it leaves to torch (sliding windows, ALiBi);
and a model whose decode steps take it, compiled and eager, against the plain path."""

from __future__ import annotations

import pytest
import torch

from layers.attention import paged_decode
from layers.quant import base
from shards import kernels
from tests.support.tiny import build_hf_model, make_worker, our_logits, save_checkpoint, tiny_config

if not kernels.load() or base.kernel_isa() < 2:
    pytest.skip("the attention kernel needs AVX-512", allow_module_level=True)


def _torch_formulation(monkeypatch, *args):
    with monkeypatch.context() as m:
        m.setattr(paged_decode, "kernel_isa", lambda: 0)
        return paged_decode.paged_decode_attention(*args)


# (sequences, heads, kv heads, head size, block size)
CASES = [(1, 9, 3, 64, 16), (5, 32, 8, 64, 16), (3, 4, 4, 128, 4), (2, 14, 2, 64, 1),
         (4, 2, 1, 16, 8)]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s, heads, kv_heads, d, bs", CASES)
def test_the_kernel_equals_the_torch_formulation(monkeypatch, dtype, s, heads, kv_heads, d, bs):
    gen = torch.Generator().manual_seed(s * heads + d)
    blocks, width = 40, 9
    k = torch.randn(blocks, bs, kv_heads, d, generator=gen).to(dtype)
    v = torch.randn(blocks, bs, kv_heads, d, generator=gen).to(dtype)
    q = torch.randn(s, heads, d, generator=gen).to(dtype)
    ids = torch.randint(1, blocks, (s, width), generator=gen)
    positions = torch.randint(0, width * bs, (s,), generator=gen)
    positions[0] = 0  # a sequence's first token sees itself only
    assert paged_decode.kernel_fits(q, k, None, None) == (dtype == torch.float32)
    got = torch.ops.shardserve_kernels.paged_decode(q, k, v, ids, positions, d**-0.5)
    ref = _torch_formulation(monkeypatch, q.float(), k.float(), v.float(), ids, positions,
                             d**-0.5, None)  # fmt: skip
    assert got.dtype == dtype
    # float32: summation order only; bfloat16: the output's own rounding (8 bits)
    tol = 1e-5 if dtype == torch.float32 else 2**-8 * ref.abs().max().item()
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=tol)


def test_windows_alibi_and_odd_heads_stay_with_torch():
    q, k = torch.zeros(1, 2, 64), torch.zeros(4, 4, 1, 64)
    assert not paged_decode.kernel_fits(q, k, 128, None)
    assert not paged_decode.kernel_fits(q, k, None, torch.ones(2))
    assert not paged_decode.kernel_fits(torch.zeros(1, 2, 24), torch.zeros(4, 4, 1, 24), None, None)
    assert not paged_decode.kernel_fits(q.half(), k.half(), None, None)
    # bfloat16 caches stay with torch's paths: SDPA verifies lookahead trees, and greedy
    # outputs must not part from plain decoding at near-ties
    assert not paged_decode.kernel_fits(q.bfloat16(), k.bfloat16(), None, None)


def test_the_kernel_refuses_mismatched_inputs():
    q, k = torch.zeros(1, 2, 64), torch.zeros(4, 4, 1, 64)
    ids, pos = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="all float32 or all bfloat16"):
        torch.ops.shardserve_kernels.paged_decode(q, k.bfloat16(), k.bfloat16(), ids, pos, 1.0)
    with pytest.raises(RuntimeError, match="int64 block_ids"):
        torch.ops.shardserve_kernels.paged_decode(q, k, k, ids.int(), pos, 1.0)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_model_decodes_through_the_kernel_as_through_torch(tmp_path, monkeypatch, compiled):
    folder = save_checkpoint(build_hf_model(tiny_config("llama")), tmp_path / "model")
    tokens = [5, 17, 99, 3, 41, 150, 8, 77, 12, 60, 33, 2]
    got = our_logits(make_worker(folder, cpu_compile=compiled), tokens, 4)
    monkeypatch.setattr(paged_decode, "kernel_isa", lambda: 0)
    ref = our_logits(make_worker(folder, cpu_compile=compiled), tokens, 4)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
