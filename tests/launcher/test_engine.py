"""Scheduler + shard together (the offline API) on a tiny model: batching, chunking, pre-emption
and prefix caching never change what a sequence generates."""

from __future__ import annotations

import random

import pytest

from launcher.llm import LLM
from router.params import GenerationParams
from shards.wire import SamplingParams
from tests.support.tiny import KIB, build_hf_model, save_checkpoint, tiny_config

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    hf = build_hf_model(tiny_config("llama", eos_token_id=None))  # no EOS: lengths are exact
    return save_checkpoint(hf, tmp_path_factory.mktemp("tiny"))


def _llm(folder, **kw) -> LLM:
    kw.setdefault("block_size", 4)
    kw.setdefault("kv_cache_memory", 512 * KIB)
    kw.setdefault("max_model_len", 128)
    kw.setdefault("dtype", "float32")  # compared with transformers in float32
    return LLM(str(folder), load_tokenizer=False, **kw)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 160) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def _alone(llm: LLM, prompts, max_tokens: int) -> list[list[int]]:
    p = GenerationParams(max_tokens=max_tokens, sampling=GREEDY)
    return [llm.generate([ids], p)[0].token_ids for ids in prompts]


@pytest.fixture(scope="module")
def reference(folder):
    prompts = _prompts(8)
    return prompts, _alone(_llm(folder, enable_prefix_caching=False), prompts, 24)


def test_mixed_batch_matches_each_sequence_alone(folder, reference):
    prompts, expected = reference
    llm = _llm(folder, max_num_batched_tokens=37)  # forces chunked prompts beside decodes
    lengths = [24, 5, 17, 24, 1, 9, 24, 13]
    outs = llm.generate(prompts, [GenerationParams(max_tokens=n, sampling=GREEDY) for n in lengths])
    for out, exp, n in zip(outs, expected, lengths):
        assert out.token_ids == exp[:n]
        assert out.finish_reason == "length"
    assert llm.scheduler.allocator.num_used == 0


def test_preemption_and_resume_give_identical_output(folder, reference):
    prompts, expected = reference
    # 24 blocks of 4 tokens cannot hold 8 sequences of up to 63 tokens at once.
    block = 2 * 2 * 4 * 2 * 16 * 4  # layers * (K, V) * block_size * kv_heads * head_dim * fp32
    llm = _llm(folder, kv_cache_memory=25 * block, max_model_len=64)
    outs = llm.generate(prompts, GenerationParams(max_tokens=24, sampling=GREEDY))
    assert llm.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    assert llm.scheduler.allocator.num_used == 0


def test_prefix_cache_hits_give_identical_output(folder, reference):
    prompts, expected = reference
    llm = _llm(folder)
    first = llm.generate(prompts, GenerationParams(max_tokens=24, sampling=GREEDY))
    again = llm.generate(prompts, GenerationParams(max_tokens=24, sampling=GREEDY))
    assert [o.token_ids for o in first] == expected
    assert [o.token_ids for o in again] == expected
    long_prompts = [i for i, p in enumerate(prompts) if len(p) > 8]
    assert all(again[i].num_cached_prompt_tokens > 0 for i in long_prompts)
    assert all(o.num_cached_prompt_tokens == 0 for o in first)


def test_prompt_extending_a_finished_conversation_reuses_its_blocks(folder):
    llm = _llm(folder)
    prompt = _prompts(1, seed=5)[0]
    first = llm.generate([prompt], GenerationParams(max_tokens=20, sampling=GREEDY))[0]
    follow_up = prompt + first.token_ids + [7, 8, 9]
    out = llm.generate([follow_up], GenerationParams(max_tokens=8, sampling=GREEDY))[0]
    # Every full block the first request computed (prompt + 19 outputs) is a hit.
    assert out.num_cached_prompt_tokens == (len(prompt) + 19) // 4 * 4
    cold = _llm(folder, enable_prefix_caching=False)
    assert (
        out.token_ids
        == cold.generate([follow_up], GenerationParams(max_tokens=8, sampling=GREEDY))[0].token_ids
    )


def test_seeded_sampling_is_independent_of_batch(folder):
    llm = _llm(folder)
    seeded = GenerationParams(
        max_tokens=16, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    )
    prompt = _prompts(1, seed=9)[0]
    alone = llm.generate([prompt], seeded)[0].token_ids
    others = _prompts(5, seed=10)
    noisy = GenerationParams(max_tokens=16, sampling=SamplingParams(temperature=1.0))
    batch = llm.generate(others[:2] + [prompt] + others[2:], [noisy] * 2 + [seeded] + [noisy] * 3)
    assert batch[2].token_ids == alone


def test_abort_frees_blocks_at_once(folder):
    llm = _llm(folder)
    seq = llm.engine.add("r1", _prompts(1)[0], GenerationParams(max_tokens=50, sampling=GREEDY))
    llm.engine.step()
    assert llm.scheduler.allocator.num_used > 0
    llm.engine.abort(seq.seq_id)
    assert llm.scheduler.allocator.num_used == 0
    assert seq.finish_reason == "abort"
    assert not llm.engine.has_work()


def test_shard_process_over_socket_matches_in_process(folder, reference):
    prompts, expected = reference
    with _llm(folder, shard_process=True) as llm:
        outs = llm.generate(prompts, GenerationParams(max_tokens=24, sampling=GREEDY))
    assert [o.token_ids for o in outs] == expected


def test_logprobs_are_returned_per_token(folder):
    llm = _llm(folder)
    p = GenerationParams(max_tokens=5, sampling=SamplingParams(temperature=0.0, logprobs=3))
    out = llm.generate([_prompts(1)[0]], p)[0]
    assert len(out.logprobs) == 5 and len(out.top_logprobs) == 5
    for token, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert top[0][0] == token  # greedy picks the most likely token
        assert lp == pytest.approx(top[0][1])
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


def test_prompt_scoring_across_chunks_matches_transformers(folder):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = _prompts(1, seed=11)[0] + _prompts(1, seed=12)[0]
    llm = _llm(folder, max_num_batched_tokens=7)  # the prompt is scored over several chunks
    sampling = SamplingParams(temperature=0.0, prompt_logprobs=0)
    out = llm.generate([prompt], GenerationParams(max_tokens=0, sampling=sampling))[0]
    assert out.token_ids == [] and out.finish_reason == "length"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    expected = [ref[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert out.prompt_logprobs == pytest.approx(expected, abs=1e-4)
    assert llm.scheduler.allocator.num_used == 0
