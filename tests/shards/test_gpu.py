"""CUDA paths: the model through the paged cache against transformers on the same GPU, greedy
generation through the engine, the quantization modes' GPU kernels against their plain-torch
oracle, KV-cache sizing and a one-rank NCCL group. Skipped without a GPU, except the check of
which attention backend a CUDA shard picks, which needs none."""

from __future__ import annotations

import gc
import logging
import random

import pytest
import torch

from launcher.groups import free_port
from layers.attention.backend import select_backend
from layers.attention.flash import flash_available
from layers.linear import ColumnParallelLinear
from layers.quant.registry import get_quant_mode
from tests.support.tiny import build_hf_model, make_worker, our_logits, save_checkpoint, tiny_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
UTIL = 0.03  # of GPU memory per test shard: a few GiB of KV cache, quick to zero-fill


@pytest.fixture(autouse=True)
def _free_gpu():
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.mark.skipif(flash_available(), reason="flash-attn is installed here")
@pytest.mark.parametrize(
    "dtype, why",
    [
        (torch.bfloat16, "flash-attn is not installed"),
        (torch.float32, "flash-attn has no torch.float32 kernels"),
    ],
)
def test_cuda_without_flash_attn_falls_back_to_sdpa_and_says_why(dtype, why, caplog):
    with caplog.at_level(logging.INFO, logger="shardserve.attention"):
        backend = select_backend(torch.device("cuda"), dtype)
    assert backend.name == "torch-sdpa"
    assert [r.getMessage() for r in caplog.records] == [f"attention on cuda: torch SDPA ({why})"]


def _cuda_spec(folder):
    from launcher.plan import config_with, shard_spec

    c = config_with(dtype="float32", gpu_memory_utilization=UTIL)
    return shard_spec(c, str(folder), "none", None, device="cuda", progress=False)


def _tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def _generate(engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from benchmarks.gpu import add_greedy

    add_greedy(engine, prompts, max_tokens, "gen")
    got: dict[int, list[int]] = {}
    while engine.has_work():
        for u in engine.step():
            got.setdefault(u.seq.seq_id, []).extend(u.new_token_ids)
    return [got[k] for k in sorted(got)]


@torch.inference_mode()
def _hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor([tokens], device=next(hf.parameters()).device)
    return hf(ids).logits[0].float()


def _pair(family: str, tmp_path, dtype: str, **kw):
    hf = build_hf_model(tiny_config(family))
    folder = save_checkpoint(hf, tmp_path / family)
    worker = make_worker(folder, device="cuda", dtype=dtype, gpu_memory_utilization=UTIL, **kw)
    return hf.to("cuda"), worker


@needs_cuda
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_float32_logits_match_transformers_on_cuda(family, chunk, tmp_path):
    hf, worker = _pair(family, tmp_path, "float32")
    assert worker.attention_backend == "torch-sdpa" and worker.runner.device.type == "cuda"
    tokens = _tokens(45, hf.config.vocab_size)
    ours = our_logits(worker, tokens, prompt_len=37, chunk=chunk)
    ref = _hf_logits(hf, tokens)
    assert ref.std() > 0.3
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)  # the CPU suite's bound


@needs_cuda
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bfloat16_logits_are_as_close_to_float32_as_transformers_bfloat16(family, tmp_path):
    # Bound: our bf16 logits are no further from the float32 reference than twice transformers'
    # own bf16 logits are (max abs), and greedy picks agree wherever the reference's top-2
    # margin is wider than that error.
    hf, worker = _pair(family, tmp_path, "bfloat16")
    tokens = _tokens(45, hf.config.vocab_size, seed=1)
    ours = our_logits(worker, tokens, prompt_len=37, chunk=7)
    ref = _hf_logits(hf, tokens)
    hf_bf16 = _hf_logits(hf.to(torch.bfloat16), tokens)
    our_err = (ours - ref).abs().max().item()
    hf_err = (hf_bf16 - ref).abs().max().item()
    print(f"{family} bf16 max abs error vs float32: ours {our_err:.4f}, transformers {hf_err:.4f}")
    assert our_err <= 2 * hf_err
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * our_err
    assert clear.sum() > len(tokens) // 2
    assert torch.equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])


@needs_cuda
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_generation_through_the_engine_matches_transformers(family, tmp_path):
    from benchmarks.gpu import gpu_engine

    hf = build_hf_model(tiny_config(family))
    folder = save_checkpoint(hf, tmp_path / family)
    spec = _cuda_spec(folder)
    prompts = [_tokens(n, hf.config.vocab_size, seed=n) for n in (5, 23, 40)]
    ours = _generate(gpu_engine(spec)[1], prompts, 24)  # one batch: prefills, then decodes
    hf = hf.to("cuda")
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([prompt], device="cuda")
        ref = hf.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        assert got == ref[0, len(prompt) :].tolist()


@needs_cuda
def test_kv_cache_fills_the_memory_share_and_no_more(tmp_path):
    util = 0.05
    folder = save_checkpoint(build_hf_model(tiny_config("llama")), tmp_path)
    torch.zeros(1, device="cuda")  # the CUDA context exists before the first reading
    free_before, total = torch.cuda.mem_get_info()
    worker = make_worker(folder, device="cuda", dtype="bfloat16", gpu_memory_utilization=util)
    free_after, _ = torch.cuda.mem_get_info()
    # Everything on the GPU, this shard included; the allocator rounds segments up (~1 MiB).
    assert total - free_after <= util * total + 16 * 2**20
    # The cache takes what the share leaves after what was there, weights and one step's
    # activations (a 2048-token prefill of a tiny model: well under a tenth of the share).
    left = util * total - (total - free_before)
    assert worker.num_blocks * worker.kv_block_bytes >= 0.9 * left


def _layer(mode: str, weight: torch.Tensor, fast: bool):
    layer = ColumnParallelLinear(
        weight.shape[1], weight.shape[0], quant=get_quant_mode(mode, fast),
        dtype=weight.dtype, device=weight.device,
    )  # fmt: skip
    layer.weight.data.copy_(weight)
    layer.finalize_weights()
    return layer


def _oracle(layer, x: torch.Tensor) -> torch.Tensor:
    return x.float() @ layer.quant.dequantized(layer).float().T


def _activations(rows: int, in_f: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, in_f, device="cuda", generator=g)
    x[:, 5] *= 30  # an outlier channel, as LLM activations have
    return x.to(torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("mode", ["ifq", "fp8", "ifq_nf4"])
@pytest.mark.parametrize("rows", [1, 3, 16, 300])
def test_gpu_quant_paths_agree_with_the_dequantize_oracle(mode, rows):
    # Bound: bf16 rounds the activations' products and the output, each relative 2^-8 of a
    # value no larger than |x| @ |W|.T; fp8 activations (W8A8) also round each input by up to
    # 2^-4 of itself, or 2^-10 of the row's scale below fp8's normal range.
    g = torch.Generator(device="cuda").manual_seed(rows)
    w = (torch.randn(4096, 1024, device="cuda", generator=g) * 0.05).to(torch.bfloat16)
    layer = _layer(mode, w, fast=True)
    x = _activations(rows, 1024, seed=rows + 1)
    got, want = layer(x).float(), _oracle(layer, x)
    deq = layer.quant.dequantized(layer).float().abs()
    magnitude = x.float().abs() @ deq.T
    bound = 2**-7 * magnitude + 1e-3
    if mode == "fp8" and layer.fp8_scale_row is not None:
        row_scale = x.float().abs().amax(1, keepdim=True) / 448
        bound = bound + 2**-4 * magnitude + 2**-10 * row_scale * deq.sum(1)[None, :]
    assert torch.all((got - want).abs() <= bound)


@needs_cuda
def test_fp8_uses_tensor_cores_for_large_linears_where_the_gpu_has_them():
    from layers.quant.dequant import FP8_MM_MIN_WEIGHTS, scaled_mm_supported

    large = torch.randn(4096, FP8_MM_MIN_WEIGHTS // 4096, device="cuda").to(torch.bfloat16)
    small = torch.randn(576, 1536, device="cuda").to(torch.bfloat16)
    hopper = torch.cuda.get_device_capability() >= (8, 9)
    assert scaled_mm_supported(large.device) == hopper
    assert (_layer("fp8", large, fast=True).fp8_scale_row is not None) == hopper
    assert _layer("fp8", small, fast=True).fp8_scale_row is None  # dequantizing is faster
    assert _layer("fp8", large, fast=False).fp8_scale_row is None  # the reference path


@needs_cuda
@pytest.mark.parametrize("mode", ["ifq", "fp8", "ifq_nf4"])
def test_quantized_model_on_cuda_matches_the_cpu_reference_path(mode, tmp_path):
    # Quantizing is deterministic, so in float32 the GPU model (fast kernels allowed) and the
    # CPU one on the plain-torch path hold the same weights: logits differ by summation order.
    hf = build_hf_model(tiny_config("llama", tie_word_embeddings=True))
    folder = save_checkpoint(hf, tmp_path / mode)
    tokens = _tokens(30, hf.config.vocab_size, seed=4)
    gpu = make_worker(
        folder, device="cuda", dtype="float32", gpu_memory_utilization=UTIL, quantization=mode
    )
    cpu = make_worker(folder, dtype="float32", quantization=mode, fast_kernels=False)
    ours = our_logits(gpu, tokens, prompt_len=24).cpu()
    torch.testing.assert_close(ours, our_logits(cpu, tokens, prompt_len=24), atol=1e-4, rtol=0)


@needs_cuda
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cuda_graph_decode_matches_eager(family, tmp_path):
    from benchmarks.gpu import gpu_engine

    folder = save_checkpoint(build_hf_model(tiny_config(family)), tmp_path / family)
    spec = _cuda_spec(folder)
    # Three sequences pad to a graph of four; the longest grows from 2 to 3 blocks of 16, from
    # the graphs 2 blocks wide to those 4 wide.
    prompts = [_tokens(n, 160, seed=n) for n in (5, 12, 20)]
    tokens = _tokens(40, 160, seed=9)
    eager_worker, eager = gpu_engine(spec)
    want = _generate(eager, prompts, 24)
    # One sequence alone, step by step, for logits.
    want_logits = our_logits(eager_worker, tokens, prompt_len=8, seq_id=7)
    del eager_worker, eager  # each shard takes its whole memory share
    gc.collect()
    torch.cuda.empty_cache()
    graph_worker, graphs = gpu_engine(spec, cuda_graphs=True)
    assert _generate(graphs, prompts, 24) == want
    assert {b for b, _ in graph_worker.runner.graphs.graphs} == {4}
    assert {w for _, w in graph_worker.runner.graphs.graphs} == {2, 4}
    got_logits = our_logits(graph_worker, tokens, prompt_len=8, seq_id=7)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=0)


@needs_cuda
def test_one_rank_nccl_group_carries_collectives_and_plans():
    import torch.distributed as dist

    from shards.distributed import PlanChannel, join_group, leave_group

    pctx, plan_group = join_group(0, 1, "cuda:0", "127.0.0.1", free_port(), 60.0)
    try:
        assert dist.get_backend() == "nccl" and dist.get_backend(plan_group) == "gloo"
        assert pctx.gather_reduce_max == 0  # NCCL all-reduces; the gather trick is for gloo
        x = torch.arange(6.0, device="cuda")
        dist.all_reduce(x)
        parts = [torch.empty_like(x)]
        dist.all_gather(parts, x)
        assert torch.equal(parts[0], torch.arange(6.0, device="cuda"))
        PlanChannel(pctx, plan_group).send({"type": "ping"})  # rank 0's side of a step
    finally:
        leave_group()
    assert not dist.is_initialized()
