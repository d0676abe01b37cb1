"""Compiled decode steps (shards/compiled_decode.py) against transformers and the eager path."""

from __future__ import annotations

import random

import pytest
import torch

from shards.compiled_decode import BATCH_SIZES
from shards.wire import NewSeq, SamplingParams, ScheduledSeq, StepPlan
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

ATOL = 1e-4  # float32, max abs, as for the eager path against transformers

# the eager tests' configurations, less those whose only difference is the rotary table
CONFIGS = {k: TINY_CONFIGS[k] for k in ("llama-gqa", "llama-tied", "llama-partial-rotary",
                                         "mistral-window", "qwen2")}  # fmt: skip
_tokens = random_tokens


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return save_checkpoint(build_hf_model(tiny_config("llama")), tmp_path_factory.mktemp("llama"))


def _compiled(worker):
    compiled = worker.runner.compiled
    assert compiled is not None and compiled.failed is None
    shapes = {(b, False) for b in BATCH_SIZES} | {(b, True) for b in compiled.tree_rows}
    assert compiled.ready == shapes, "start-up compiles every batch size"
    return compiled


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_decode_logits_match_transformers(name, tmp_path):
    hf = build_hf_model(CONFIGS[name]())
    worker = make_worker(save_checkpoint(hf, tmp_path), cpu_compile=True)
    _compiled(worker)
    tokens = _tokens(45, hf.config.vocab_size)  # decodes cross several 4-token blocks
    ours = our_logits(worker, tokens, prompt_len=20)
    torch.testing.assert_close(ours, hf_logits(hf, tokens, prompt_len=20), atol=ATOL, rtol=0)


def _prefilled_batch(worker, n: int, seed: int) -> list[ScheduledSeq]:
    """n sequences of different lengths with their prompts in the cache, each about to decode
    one token; block tables of different widths."""
    rng = random.Random(seed)
    bs = worker.block_size
    seqs, next_block = [], 1
    for i in range(n):
        prompt = _tokens(rng.randrange(3, 30), worker.cfg.vocab_size, seed * 100 + i)
        nb = len(prompt) // bs + 1
        table = list(range(next_block, next_block + nb))
        next_block += nb
        worker.runner.forward([ScheduledSeq(i, prompt[:-1], 0, table, False)])
        seqs.append(ScheduledSeq(i, prompt[-1:], len(prompt) - 1, table, True))
    return seqs


# (quantization, fast kernels, batch, atol). ifq with fast kernels runs the two-pass int8 GEMM
# both ways from 5 rows, whose activation rounding (~15 bits, layers/quant/int8.py) turns 1e-7
# differences in its input (attention summed in another order) into steps of ~1e-4 in the
# logits; below 5 rows the compiled step is exact where the eager GEMM rounds, so those batch
# sizes are checked against the plain-torch ifq path (fast=False) instead.
PADDED_CASES = [
    *[("none", True, n, 1e-5) for n in (1, 3, 7, 16)],
    *[("ifq", False, n, 1e-5) for n in (1, 3, 7, 16)],
    ("ifq", True, 7, 5e-4),
    ("ifq", True, 16, 5e-4),
    # fp8: its codes decoded inside the fused reduction (up to 4 rows) or dequantized inside the
    # graph (more), against its eager dequantize-then-matmul
    *[("fp8", True, n, 1e-5) for n in (1, 3, 16)],
    # ifq_nf4 on an AVX-512 VNNI CPU: the NF4 kernel both ways, whose activation rounding (128ths
    # of a step) turns input differences of 1e-7 into logit steps of ~1e-4, as ifq's two passes
    *[("ifq_nf4", True, n, 5e-4) for n in (1, 3, 16)],
]


@pytest.mark.parametrize("quantization,fast,n,atol", PADDED_CASES)
@torch.inference_mode()
def test_padded_batches_match_the_eager_step(llama_folder, quantization, fast, n, atol):
    """Every batch size (padded up to a compiled one) gives each sequence the eager logits."""
    worker = make_worker(
        llama_folder, cpu_compile=True, quantization=quantization, fast_kernels=fast
    )
    seqs = _prefilled_batch(worker, n, seed=n)
    hidden, _ = worker.runner.forward(seqs)
    eager = worker.model.compute_logits(hidden)
    compiled = _compiled(worker).run(seqs)
    assert compiled.shape == eager.shape
    torch.testing.assert_close(compiled, eager, atol=atol, rtol=0)


@torch.inference_mode()
def test_int8_compiled_matches_the_dequantize_oracle(llama_folder):
    """ifq without fast kernels is the plain-torch oracle; compiled steps read the same int8
    values as one fused reduction per row."""
    oracle = make_worker(llama_folder, quantization="ifq", fast_kernels=False)
    compiled = make_worker(llama_folder, quantization="ifq", fast_kernels=False, cpu_compile=True)
    _assert_same_logits(compiled, oracle, seed=5)


def _assert_same_logits(compiled, eager, seed: int, atol: float = 1e-5) -> None:
    """A prompt, then decoding: the compiled worker's logits against the eager one's."""
    _compiled(compiled)
    tokens = _tokens(30, eager.cfg.vocab_size, seed=seed)
    torch.testing.assert_close(
        our_logits(compiled, tokens, prompt_len=12),
        our_logits(eager, tokens, prompt_len=12),
        atol=atol,
        rtol=0,
    )


@pytest.mark.parametrize(("mode", "atol"), [("fp8", 1e-5), ("ifq_nf4", 5e-4)])  # as above
@torch.inference_mode()
def test_memory_modes_compiled_with_a_tied_head_match_their_eager_path(tmp_path, mode, atol):
    """fp8 and nf4 leave a tied head float, read from the embedding's table (no packed copy):
    compiled steps stream it through the fused reduction."""
    folder = save_checkpoint(
        build_hf_model(tiny_config("llama", tie_word_embeddings=True)), tmp_path
    )
    eager = make_worker(folder, quantization=mode)
    compiled = make_worker(folder, quantization=mode, cpu_compile=True)
    _assert_same_logits(compiled, eager, seed=9, atol=atol)


def _tree_batch(worker, trees: list[list[int] | None], seed: int) -> list[ScheduledSeq]:
    """Prefilled sequences, each running one token (None) or a draft tree with these parents."""
    rng = random.Random(seed)
    bs, next_block, seqs = worker.block_size, 1, []
    for i, parents in enumerate(trees):
        prompt = _tokens(rng.randrange(3, 30), worker.cfg.vocab_size, seed * 100 + i)
        n = 1 + len(parents or [])
        nb = (len(prompt) - 1 + n) // bs + 1
        table = list(range(next_block, next_block + nb))
        next_block += nb
        worker.runner.forward([ScheduledSeq(i, prompt[:-1], 0, table, False)])
        drafts = [rng.randrange(3, worker.cfg.vocab_size) for _ in range(n - 1)]
        seqs.append(ScheduledSeq(i, prompt[-1:] + drafts, len(prompt) - 1, table, True,
                                 draft_parents=parents))  # fmt: skip
    return seqs


# a tree of two branches; a chain of one draft; two chains of 8 (17 rows, padded to 32)
TREE_CASES = [[0, 1, 2, 0, 4], [0], [0, 1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13, 14, 15]]


# (quantization, fast kernels): float32 as served; ifq's plain-torch path (its fast int8 GEMM
# rounds activations, differently at different row counts: see PADDED_CASES)
@pytest.mark.parametrize("quantization,fast", [("none", True), ("ifq", False)])
@pytest.mark.parametrize("tree", TREE_CASES, ids=["branches", "one-draft", "two-chains"])
@torch.inference_mode()
def test_tree_steps_match_the_eager_tree_step(llama_folder, tree, quantization, fast):
    """Every node's logits from the compiled tree step (rows with their own positions, slots
    and mask) against the eager step that runs the same trees (layers/attention/tree.py)."""
    worker = make_worker(llama_folder, cpu_compile=True, quantization=quantization,
                         fast_kernels=fast, lookahead=True)  # fmt: skip
    compiled = _compiled(worker)
    assert compiled.tree_rows
    seqs = _tree_batch(worker, [None, tree], seed=len(tree))
    # the second sequence's tree, alone in its step (several sequences' steps run eagerly)
    assert not compiled.fits_tree(seqs) and compiled.fits_tree(seqs[1:])
    got = compiled.run_tree(seqs[1:])
    hidden, _ = worker.runner.forward(seqs[1:])  # rewrites the same K/V, then attends eagerly
    torch.testing.assert_close(got, worker.model.compute_logits(hidden), atol=1e-5, rtol=0)


def test_tree_steps_stay_eager_with_a_sliding_window(tmp_path):
    folder = save_checkpoint(build_hf_model(tiny_config("mistral", sliding_window=6)), tmp_path)
    worker = make_worker(folder, cpu_compile=True, lookahead=True)
    assert worker.runner.compiled.tree_rows == ()


def test_models_described_differently_never_share_a_graph(tmp_path):
    """Module guards are dropped (shards/compile_cache.py): two models with the same shapes
    but a different sliding window, loaded in one process, each get their own compiled steps."""
    full = build_hf_model(tiny_config("mistral", sliding_window=None))
    windowed = build_hf_model(tiny_config("mistral", sliding_window=6))
    tokens = _tokens(30, full.config.vocab_size, seed=7)
    for name, hf in (("full", full), ("windowed", windowed)):
        worker = make_worker(save_checkpoint(hf, tmp_path / name), cpu_compile=True)
        ours = our_logits(worker, tokens, prompt_len=10)
        torch.testing.assert_close(ours, hf_logits(hf, tokens, prompt_len=10), atol=ATOL, rtol=0)


@torch.inference_mode()
def test_a_failed_compile_falls_back_to_eager(llama_folder):
    worker = make_worker(llama_folder, cpu_compile=True)
    compiled = _compiled(worker)
    seqs = _prefilled_batch(worker, 2, seed=3)
    hidden, _ = worker.runner.forward(seqs)
    expected = worker.model.compute_logits(hidden).argmax(-1).tolist()

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    compiled.ready.clear()  # as if never compiled: the next step compiles, and fails
    compiled.compiled_head = broken
    greedy = SamplingParams(temperature=0.0)
    new = [NewSeq(s.seq_id, greedy, []) for s in seqs]
    result = worker.execute(StepPlan(1, seqs, new_seqs=new))
    assert compiled.failed and "no C++ compiler" in compiled.failed
    assert compiled.run(seqs) is None  # from now on every step runs eagerly
    assert [o.token_ids for o in result.outputs] == [[t] for t in expected]


def test_steps_that_are_not_plain_decodes_run_eagerly(llama_folder):
    worker = make_worker(llama_folder, cpu_compile=True)
    compiled = _compiled(worker)
    decode = ScheduledSeq(1, [5], 3, [1], True)
    assert compiled.fits([decode])
    assert not compiled.fits([ScheduledSeq(1, [5, 6], 0, [1], True)])  # a prompt chunk
    assert not compiled.fits([ScheduledSeq(1, [5], 3, [1], True, prompt_targets=[7])])
    assert not compiled.fits([decode] * (BATCH_SIZES[-1] + 1))
