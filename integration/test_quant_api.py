"""Quantized serving through the API: `ifq` and `smoothquant` answer greedily as the offline
engine does with the same mode, `auto` picks as the spec says and says why, and a missing or
mismatched SmoothQuant file is a start-up error."""

from __future__ import annotations

import re

import httpx
import pytest
import torch

from integration.conftest import start_server

MESSAGES = [{"role": "user", "content": "Name three colours."}]


def _api_vs_offline(tmp_path_factory, folder, mode: str, env: dict) -> str:
    """Serve `folder` with `env`, ask one greedy chat question, and check the offline engine
    with quantization `mode` answers the same; returns the server's log."""
    from launcher.llm import LLM
    from router.params import GenerationParams
    from shards.wire import SamplingParams

    server = start_server(
        tmp_path_factory, mode, ["--model-path", str(folder), "--kv-cache-memory", "64MiB"], env
    )
    try:
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": MESSAGES, "temperature": 0, "max_tokens": 16},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        api = r.json()["choices"][0]["message"]["content"]
        logs = server.logs()
    finally:
        server.stop()
    with LLM(str(folder), quantization=mode, kv_cache_memory=2**26, dtype="float32") as llm:
        offline = llm.generate(
            [llm.encode_chat(MESSAGES)],
            GenerationParams(max_tokens=16, sampling=SamplingParams(temperature=0)),
        )
    assert api == offline[0].text and api
    return logs


def test_ifq_api_greedy_equals_offline_ifq(tmp_path_factory, tiny_folder):
    logs = _api_vs_offline(tmp_path_factory, tiny_folder, "ifq", {"QUANTIZATION": "auto"})
    assert "QUANTIZATION=auto: ifq" in logs


@pytest.mark.parametrize("mode", ["fp8", "ifq_nf4"])
def test_dequantized_modes_api_greedy_equals_offline(tmp_path_factory, tiny_folder, mode):
    logs = _api_vs_offline(tmp_path_factory, tiny_folder, mode, {"QUANTIZATION": mode})
    assert f"quantization {mode} on cpu" in logs


def _serve_fails(folder, env: dict) -> str:
    import os
    import subprocess
    import sys

    from integration.conftest import ROOT

    r = subprocess.run(
        [sys.executable, "-m", "launcher", "serve", "--model-path", str(folder), "--port", "1"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    return r.stderr


def test_auto_serves_a_folder_holding_only_the_smoothquant_file(tmp_path_factory, tiny_folder):
    from launcher.quantize import quantize

    out = tmp_path_factory.mktemp("smoothquant") / "model"
    quantize(str(tiny_folder), str(out), calibration_tokens=512, window=128, progress=False)
    assert not list(out.glob("model*.safetensors"))  # only config, tokenizer and the file
    env = {"QUANTIZATION": "auto", "QUALITY_CHECK": "1"}
    logs = _api_vs_offline(tmp_path_factory, out, "smoothquant", env)
    assert "QUANTIZATION=auto: smoothquant" in logs
    # a random tiny model over a 49k vocabulary scores near-uniform: perplexity in the 10^4s
    assert re.search(r"quality-check: held-out perplexity \d{4,}\.\d+ over \d+ tokens "
                     r"\(quantization smoothquant\)", logs)  # fmt: skip


def test_smoothquant_without_its_file_is_a_start_up_error(tiny_folder):
    err = _serve_fails(tiny_folder, {"QUANTIZATION": "smoothquant"})
    assert "smoothq_model-8bit-auto.safetensors" in err and "shardserve quantize" in err


def test_a_smoothquant_file_for_another_model_is_a_start_up_error(tmp_path, tiny_folder):
    import shutil

    from safetensors.torch import save_file

    from layers.quant.smoothquant import FORMAT, FORMAT_VERSION

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "architecture": "LlamaForCausalLM",
            "hidden_size": "4096", "num_hidden_layers": "2", "vocab_size": "49152"}  # fmt: skip
    save_file({"x": torch.zeros(1)}, str(folder / "smoothq_model-8bit-auto.safetensors"), meta)
    err = _serve_fails(folder, {"QUANTIZATION": "auto"})
    assert "was made for another model: hidden_size 4096 (config.json: 64)" in err
    (folder / "smoothq_model-8bit-auto.safetensors").write_bytes(b"not safetensors")
    err = _serve_fails(folder, {"QUANTIZATION": "smoothquant"})
    assert "cannot read safetensors file" in err
