"""What the API generates: stream == non-stream, API == offline engine, stops, usage, seeds."""

from __future__ import annotations

import httpx
import pytest

from integration.sse import chat_stream_text, stream_events


def _chat(server, content: str, **kw) -> dict:
    body = {"messages": [{"role": "user", "content": content}], **kw}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _stream_chat(server, content: str, **kw) -> tuple[str, str]:
    body = {"messages": [{"role": "user", "content": content}], "stream": True, **kw}
    return chat_stream_text(stream_events(f"{server.url}/v1/chat/completions", body))


def test_stream_text_equals_non_stream_text_greedy(embedded_server):
    kw = dict(temperature=0, max_tokens=40)
    whole = _chat(embedded_server, "Describe a cat in one sentence.", **kw)
    text, reason = _stream_chat(embedded_server, "Describe a cat in one sentence.", **kw)
    assert text == whole["choices"][0]["message"]["content"]
    assert reason == whole["choices"][0]["finish_reason"]


def test_api_greedy_equals_offline_engine(embedded_server, embedded_folder):
    from launcher.llm import LLM
    from router.params import GenerationParams
    from shards.wire import SamplingParams

    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    api = _chat(embedded_server, messages[0]["content"], temperature=0, max_tokens=32)
    llm = LLM(
        str(embedded_folder), kv_cache_memory=256 * 2**20, max_model_len=1024, dtype="float32"
    )
    offline = llm.generate(
        [llm.encode_chat(messages)],
        GenerationParams(max_tokens=32, sampling=SamplingParams(temperature=0)),
    )
    assert api["choices"][0]["message"]["content"] == offline[0].text
    assert api["usage"]["completion_tokens"] == len(offline[0].token_ids)


def test_usage_and_length_finish_with_ignore_eos(tiny_server):
    out = _chat(tiny_server, "hi", temperature=0, max_tokens=17, ignore_eos=True)
    usage = out["usage"]
    assert usage["completion_tokens"] == 17
    assert usage["total_tokens"] == usage["prompt_tokens"] + 17
    assert out["choices"][0]["finish_reason"] == "length"


def test_max_tokens_is_clamped_to_the_room_left(tiny_server):
    # The tiny model's context is 512 tokens: without max_tokens it may use all the rest.
    out = _chat(tiny_server, "hi", temperature=0, ignore_eos=True)
    usage = out["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 512
    assert out["choices"][0]["finish_reason"] == "length"


@pytest.fixture(scope="module")
def greedy_reference(tiny_server) -> str:
    text = _chat(tiny_server, "Tell me something.", temperature=0, max_tokens=60, ignore_eos=True)[
        "choices"
    ][0]["message"]["content"]
    assert len(text) > 40
    return text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_text_before_it(tiny_server, greedy_reference, stream):
    stop = greedy_reference[20:26]
    expected = greedy_reference[: greedy_reference.index(stop)]
    kw = dict(temperature=0, max_tokens=60, ignore_eos=True, stop=[stop])
    if stream:
        text, reason = _stream_chat(tiny_server, "Tell me something.", **kw)
    else:
        out = _chat(tiny_server, "Tell me something.", **kw)
        text, reason = out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"]
    assert text == expected
    assert reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_earliest_of_several_stop_strings_wins(tiny_server, greedy_reference, stream):
    early, late = greedy_reference[10:13], greedy_reference[30:40]
    expected = greedy_reference[: greedy_reference.index(early)]
    kw = dict(temperature=0, max_tokens=60, ignore_eos=True, stop=[late, early])
    if stream:
        text, _ = _stream_chat(tiny_server, "Tell me something.", **kw)
    else:
        text = _chat(tiny_server, "Tell me something.", **kw)["choices"][0]["message"]["content"]
    assert text == expected


def test_stop_string_at_the_start_gives_empty_text(tiny_server, greedy_reference):
    text, reason = _stream_chat(
        tiny_server,
        "Tell me something.",
        temperature=0,
        max_tokens=60,
        ignore_eos=True,
        stop=[greedy_reference[:3]],
    )
    assert text == "" and reason == "stop"


def test_seed_reproduces_sampled_text(tiny_server):
    kw = dict(temperature=1.0, max_tokens=30, ignore_eos=True)
    a = _chat(tiny_server, "x", seed=7, **kw)["choices"][0]["message"]["content"]
    b = _chat(tiny_server, "x", seed=7, **kw)["choices"][0]["message"]["content"]
    c = _chat(tiny_server, "x", seed=8, **kw)["choices"][0]["message"]["content"]
    assert a == b
    assert a != c


def test_sampled_stream_equals_non_stream_with_seed(tiny_server):
    kw = dict(temperature=1.0, max_tokens=50, ignore_eos=True, seed=3)
    whole = _chat(tiny_server, "y", **kw)["choices"][0]["message"]["content"]
    text, _ = _stream_chat(tiny_server, "y", **kw)
    assert text == whole


def test_completions_echo_round_trips_cjk_and_emoji(tiny_server):
    prompt = "你好，世界 🌍✨ naïve café"
    r = httpx.post(
        f"{tiny_server.url}/v1/completions",
        json={"prompt": prompt, "echo": True, "max_tokens": 1},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].startswith(prompt)


def test_completions_accepts_token_ids_and_batches(tiny_server):
    r = httpx.post(
        f"{tiny_server.url}/v1/completions",
        json={"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 4, "temperature": 0, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 8


def test_logprobs_are_reported_for_chat(tiny_server):
    out = _chat(
        tiny_server,
        "z",
        temperature=0,
        max_tokens=5,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=2,
    )
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    for entry in content:
        assert entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_with_logprobs_scores_the_prompt_like_transformers(
    tiny_server, tiny_folder, max_tokens
):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "The quick brown fox jumps over the lazy dog, again and again and again."
    r = httpx.post(
        f"{tiny_server.url}/v1/completions",
        json={
            "prompt": text,
            "echo": True,
            "logprobs": 2,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"].startswith(text)
    lp = choice["logprobs"]
    ids = AutoTokenizer.from_pretrained(tiny_folder).encode(text)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    assert len(lp["tokens"]) == len(ids) + max_tokens
    assert all(len(t) == 2 for t in lp["top_logprobs"][1:])
