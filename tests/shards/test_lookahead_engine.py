"""Lookahead through the real runner: greedy output with drafts equals plain greedy decoding,
token for token, in float32, on a tiny random model and on the embedded default."""

from __future__ import annotations

import random

import pytest

from launcher.llm import LLM
from router.params import GenerationParams
from shards.wire import SamplingParams
from tests.support.tiny import build_hf_model, save_checkpoint, tiny_config

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    cfg = tiny_config("llama", num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                      vocab_size=48, max_position_embeddings=512)  # fmt: skip
    return save_checkpoint(build_hf_model(cfg), tmp_path_factory.mktemp("la") / "model")


def _prompts(rng: random.Random, n: int) -> list[list[int]]:
    """Prompts with repeated spans, so the n-gram drafter finds matches."""
    out = []
    for _ in range(n):
        span = [rng.randrange(3, 48) for _ in range(rng.randrange(3, 9))]
        filler = [rng.randrange(3, 48) for _ in range(rng.randrange(0, 12))]
        out.append(filler + span * rng.randrange(2, 5) + span[: rng.randrange(1, len(span))])
    return out


def _run(folder, prompts, params, **kw):
    with LLM(str(folder), load_tokenizer=False, kv_cache_memory=2**24, block_size=4,
             max_model_len=512, dtype="float32", **kw) as llm:  # fmt: skip
        if llm.scheduler.drafter is not None:  # verify trees at every step, even where they
            llm.scheduler.drafter.gate_on_cost = False  # would not pay on this tiny model
        done = llm.generate(prompts, params)
        return [c.token_ids for c in done], llm.scheduler


@pytest.mark.parametrize("seed", range(4))
def test_greedy_output_is_identical_with_lookahead(tiny_folder, seed):
    rng = random.Random(seed)
    prompts = _prompts(rng, rng.choice([1, 3, 8]))
    params = [
        GenerationParams(max_tokens=rng.randrange(1, 48), sampling=GREEDY, ignore_eos=True)
        for _ in prompts
    ]
    budget = rng.choice([16, 64, 2048])
    plain, _ = _run(tiny_folder, prompts, params, max_num_batched_tokens=budget)
    ahead, sched = _run(
        tiny_folder,
        prompts,
        params,
        max_num_batched_tokens=budget,
        use_lookahead=True,
        num_speculative_tokens=rng.choice([2, 5, 8]),
    )
    assert ahead == plain
    assert sched.num_draft_proposed > 0
    assert sched.allocator.num_used == 0


def test_logprobs_with_lookahead_match_plain(tiny_folder):
    prompts = _prompts(random.Random(7), 2)
    params = GenerationParams(
        max_tokens=24, sampling=SamplingParams(temperature=0.0, logprobs=2), ignore_eos=True
    )
    with LLM(str(tiny_folder), load_tokenizer=False, kv_cache_memory=2**24, block_size=4,
             dtype="float32") as llm:  # fmt: skip
        plain = llm.generate(prompts, params)
    with LLM(str(tiny_folder), load_tokenizer=False, kv_cache_memory=2**24, block_size=4,
             use_lookahead=True, dtype="float32") as llm:  # fmt: skip
        llm.scheduler.drafter.gate_on_cost = False
        ahead = llm.generate(prompts, params)
        assert llm.scheduler.num_draft_accepted > 0
    for p, a in zip(plain, ahead):
        assert a.token_ids == p.token_ids
        assert a.logprobs == pytest.approx(p.logprobs, abs=1e-4)
        assert [[t for t, _ in row] for row in a.top_logprobs] == [
            [t for t, _ in row] for row in p.top_logprobs
        ]


def test_embedded_model_quoting_a_document_is_identical_and_accepts_drafts():
    from launcher.embedded import ensure_embedded_model

    folder = str(ensure_embedded_model())
    doc = (
        "The lighthouse at Point Reyes was built in 1870. Its first-order Fresnel lens has 1,032 "
        "glass prisms and was made in France. Keepers climbed 308 steps to reach it each night."
    )
    messages = [
        {"role": "user", "content": f"{doc}\n\nCopy the second sentence of the text exactly."}
    ]
    params = GenerationParams(max_tokens=40, sampling=GREEDY)
    out = {}
    for ahead in (False, True):
        with LLM(
            folder, kv_cache_memory=2**28, max_model_len=2048, use_lookahead=ahead, dtype="float32"
        ) as llm:
            out[ahead] = llm.generate([llm.encode_chat(messages)], params)[0].token_ids
            accepted = llm.scheduler.num_draft_accepted
    assert out[True] == out[False]
    assert accepted > 5  # the answer quotes the prompt: drafts from it are accepted


# chi-square critical values at p = 0.001 by degrees of freedom
_CHI2_999 = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59]


def _chi2(a: list[int], b: list[int]) -> tuple[float, float]:
    """Two-sample chi-square statistic over the outcomes both samples show (equal sizes), and
    the critical value at p = 0.001 for its degrees of freedom."""
    keys = sorted(set(a) | set(b))
    stat = 0.0
    for k in keys:
        x, y = a.count(k), b.count(k)
        stat += (x - y) ** 2 / (x + y)
    return stat, _CHI2_999[min(len(keys) - 2, len(_CHI2_999) - 1)]


def _sampled_outputs(folder, lookahead: bool, n: int = 400) -> tuple[list, int]:
    prompt = [5, 9, 14, 22, 5, 9, 14, 22, 5, 9, 14, 22, 5, 9]
    params = [
        GenerationParams(
            max_tokens=3,
            sampling=SamplingParams(temperature=0.8, top_k=3, seed=i),
            ignore_eos=True,
        )
        for i in range(n)
    ]
    done, sched = _run(folder, [prompt] * n, params, use_lookahead=lookahead, max_num_seqs=8)
    return [tuple(t[1:]) for t in done], sched.num_draft_proposed


def test_sampled_output_keeps_its_distribution_with_lookahead(tiny_folder, monkeypatch):
    plain, _ = _sampled_outputs(tiny_folder, False)
    ahead, proposed = _sampled_outputs(tiny_folder, True)
    assert proposed > 100
    for pos in (0, 1):  # the 2nd and 3rd output tokens, both drawn through verification
        stat, critical = _chi2([t[pos] for t in plain], [t[pos] for t in ahead])
        assert stat < critical, (pos, stat)
    # the test has teeth: accepting every first-branch draft skews the outputs
    import shards.runner

    def always_accept(probs, token_ids, parents, generator):
        path = [i for i, p in enumerate(parents, start=1) if p == i - 1]
        return path, [token_ids[c] for c in path] + [int(probs[path[-1] if path else 0].argmax())]

    monkeypatch.setattr(shards.runner, "accept_sampled", always_accept)
    broken, _ = _sampled_outputs(tiny_folder, True)
    stat, critical = _chi2([t[0] for t in plain], [t[0] for t in broken])
    assert stat > critical
