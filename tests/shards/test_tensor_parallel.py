"""Tensor parallelism over gloo: every rank in its own process, logits and greedy output equal
to one rank; start-up checks of the TP size; the worker-group layout."""

from __future__ import annotations

import random

import pytest
import torch

from launcher.groups import cpu_threads, group_specs
from layers.parallel import ShardingError
from shards.model_config import check_tensor_parallel, model_config_from_dict
from tests.support.tiny import build_hf_model, make_worker, our_logits, save_checkpoint, tiny_config
from tests.support.tp import all_reduce_results, tp_logits

ATOL = 1e-4

CONFIGS = {
    # 8 heads / 4 KV heads: TP 2 and 4 split both evenly
    "llama": lambda: tiny_config("llama", num_attention_heads=8, num_key_value_heads=4),
    # 2 KV heads: at TP 4 each KV head is replicated on two ranks; QKV bias is column-split
    "qwen2": lambda: tiny_config("qwen2", num_attention_heads=8, num_key_value_heads=2),
    # tied embeddings: the vocab-parallel embedding and LM head share one sharded weight
    "llama-tied-bias": lambda: tiny_config(
        "llama",
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        vocab_size=157,  # not a multiple of TP: the last rank's vocab rows are padded
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def folder(request, tmp_path_factory):
    hf = build_hf_model(CONFIGS[request.param]())
    return save_checkpoint(hf, tmp_path_factory.mktemp(request.param) / "model")


def _tokens(n: int, vocab: int) -> list[int]:
    rng = random.Random(1)
    return [rng.randrange(3, vocab) for _ in range(n)]


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_logits_equal_one_rank(folder, tp):
    vocab = make_worker(folder).cfg.vocab_size
    tokens = _tokens(30, vocab)
    # a 20-token prompt in chunks of 7 over 4-token blocks, then 10 decode steps
    ref = our_logits(make_worker(folder), tokens, 20, chunk=7)
    got = tp_logits(folder, tp, tokens, 20, chunk=7)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= ATOL


def test_tp_greedy_output_equals_one_rank(folder):
    from launcher.llm import LLM
    from router.params import GenerationParams
    from shards.wire import SamplingParams

    greedy = GenerationParams(
        max_tokens=12, sampling=SamplingParams(temperature=0.0), ignore_eos=True
    )
    scored = GenerationParams(
        max_tokens=4,
        sampling=SamplingParams(temperature=0.0, logprobs=0, prompt_logprobs=0),
        ignore_eos=True,
    )
    vocab = make_worker(folder).cfg.vocab_size
    prompts = [_tokens(n, vocab) for n in (3, 9, 17, 26)]  # mixed prefill and decode steps
    params = [greedy, greedy, scored, greedy]  # one prompt also scored, as echo+logprobs does
    outs, logprobs = [], []
    for tp in (1, 2):
        with LLM(
            str(folder),
            tensor_parallel_size=tp,
            dtype="float32",
            load_tokenizer=False,
            block_size=4,
            kv_cache_memory=2**20,
            max_num_batched_tokens=24,  # forces chunked prefill next to decodes
            num_threads=1,
        ) as llm:
            done = llm.generate(prompts, params)
            outs.append([c.token_ids for c in done])
            logprobs.append(torch.tensor(done[2].prompt_logprobs + done[2].logprobs))
    assert outs[0] == outs[1]
    assert [len(t) for t in outs[0]] == [12, 12, 4, 12]
    assert len(logprobs[0]) == 17 - 1 + 4
    assert (logprobs[0] - logprobs[1]).abs().max().item() <= ATOL


def _cfg(**kw):
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 160,
        "max_position_embeddings": 256,
    }
    raw.update(kw)
    return model_config_from_dict(raw)


@pytest.mark.parametrize(
    "kw,tp,needle",
    [
        ({}, 3, "does not divide 8 attention heads"),
        ({"num_key_value_heads": 3, "num_attention_heads": 6}, 2, "3 KV heads"),
        ({"intermediate_size": 130}, 4, "intermediate size 130"),
        ({}, 16, "8 attention heads"),
    ],
)
def test_tp_that_does_not_divide_the_model_is_refused(kw, tp, needle):
    with pytest.raises(ShardingError, match=needle):
        check_tensor_parallel(_cfg(**kw), tp)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_tp_that_divides_or_replicates_is_accepted(tp):
    check_tensor_parallel(_cfg(), tp)  # 4 KV heads: split at 2 and 4, replicated at 8


def _spec(**local):
    from launcher.config import Config
    from launcher.plan import shard_spec

    return shard_spec(Config(), "m", "none", None, **local)


def test_group_layout_on_gpus():
    base = _spec(device="cuda")
    specs = group_specs(base, 2, group_index=1, num_groups=2, master_port=29500)
    assert [(s.rank, s.world_size, s.device) for s in specs] == [(0, 2, "cuda:2"), (1, 2, "cuda:3")]
    assert {s.master_port for s in specs} == {29500}
    assert [s.progress for s in specs] == [True, False]


def test_group_layout_across_nodes():
    base = _spec(device="cuda")
    specs = group_specs(base, 4, master_port=29500, nnodes=2, node_rank=1)
    assert [(s.rank, s.device) for s in specs] == [(2, "cuda:0"), (3, "cuda:1")]


def test_cpu_ranks_share_the_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert cpu_threads(1) is None
    assert cpu_threads(2) == 4
    assert cpu_threads(16) == 1
    specs = group_specs(_spec(), 2, num_groups=2)
    assert [s.num_threads for s in specs] == [2, 2]
    assert specs[0].master_port == specs[1].master_port > 0


def test_all_reduce_sums_over_ranks_on_both_paths(tmp_path):
    ws = 3
    per_rank = all_reduce_results(tmp_path, ws)
    factor = sum(r + 1 for r in range(ws))
    for n, got in per_rank[0].items():
        assert torch.equal(got, torch.arange(n, dtype=torch.float32) * factor), n
        assert all(torch.equal(got, other[n]) for other in per_rank[1:])  # same bits everywhere


def _tp(argv: list[str], device: str, gpus: int) -> int:
    from launcher.config import load_config
    from launcher.model_resolution import ResolvedModel
    from launcher.serve import tensor_parallel_size

    c = load_config(["--model-path", "/nonexistent", *argv], {})
    return tensor_parallel_size(c, ResolvedModel("/m", "m", _cfg(), False), device, gpus)


def test_tp_defaults_and_limits():
    from launcher.config import ConfigError

    assert _tp([], "cpu", 0) == 1
    assert _tp([], "cuda", 4) == 4
    assert _tp(["--worker-num", "2"], "cuda", 4) == 2
    assert _tp(["--nnodes", "2", "--master-port", "29500"], "cuda", 2) == 4
    with pytest.raises(ConfigError, match="needs 4 GPUs on this node; 2 visible"):
        _tp(["--num-gpus", "4"], "cuda", 2)
    with pytest.raises(ConfigError, match="needs 4 GPUs on this node; 3 visible"):
        _tp(["--num-gpus", "2", "--worker-num", "2"], "cuda", 3)
    with pytest.raises(ConfigError, match="--num-gpus 3: tensor parallel size 3"):
        _tp(["--num-gpus", "3"], "cpu", 0)
    with pytest.raises(ConfigError, match="does not split evenly over --nnodes 2"):
        _tp(["--num-gpus", "3", "--nnodes", "2", "--master-port", "1"], "cpu", 0)


def test_a_rank_loads_only_its_slices(tmp_path):
    from layers.attention.backend import select_backend
    from layers.parallel import ParallelContext
    from shards.loader import load_weights
    from shards.model_config import load_model_config
    from shards.models.base import BuildContext
    from shards.models.registry import model_class

    hf = build_hf_model(tiny_config("llama", num_attention_heads=8, num_key_value_heads=4))
    folder = save_checkpoint(hf, tmp_path / "model", "bin")  # .bin: read whole, then sliced
    cfg = load_model_config(folder)
    loaded = []
    for ws in (1, 2, 4):
        bc = BuildContext(
            pctx=ParallelContext(rank=ws - 1, world_size=ws),
            dtype=torch.float32,
            device=torch.device("cpu"),
            backend=select_backend(torch.device("cpu"), torch.float32),
            max_position=cfg.max_position_embeddings,
        )
        model = model_class(cfg.architecture)(cfg, bc)
        loaded.append(load_weights(model, str(folder), progress=False)["bytes"])
    # everything but the norms is split: each rank holds about 1/TP of the bytes
    assert loaded[1] < 0.55 * loaded[0]
    assert loaded[2] < 0.3 * loaded[0]
