"""Quantized serving through the API: `ifq` answers greedily as the offline engine does with the
same mode, `auto` picks ifq here and says why, and an unbuilt mode is refused at start-up."""

from __future__ import annotations

import httpx

from integration.conftest import start_server


def test_ifq_api_greedy_equals_offline_ifq(tmp_path_factory, tiny_folder):
    from launcher.llm import LLM
    from router.params import GenerationParams
    from shards.wire import SamplingParams

    messages = [{"role": "user", "content": "Name three colours."}]
    server = start_server(
        tmp_path_factory,
        "ifq",
        ["--model-path", str(tiny_folder), "--kv-cache-memory", "64MiB"],
        env={"QUANTIZATION": "auto"},
    )
    try:
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": messages, "temperature": 0, "max_tokens": 16},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        api = r.json()["choices"][0]["message"]["content"]
        assert "QUANTIZATION=auto: ifq" in server.logs()
    finally:
        server.stop()
    with LLM(str(tiny_folder), quantization="ifq", kv_cache_memory=2**26) as llm:
        offline = llm.generate(
            [llm.encode_chat(messages)],
            GenerationParams(max_tokens=16, sampling=SamplingParams(temperature=0)),
        )
    assert api == offline[0].text and api


def test_auto_with_a_smoothquant_file_is_refused_until_built(tmp_path, tiny_folder):
    import os
    import shutil
    import subprocess
    import sys

    from integration.conftest import ROOT

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    (folder / "smoothq_model-8bit-auto.safetensors").write_bytes(b"")
    r = subprocess.run(
        [sys.executable, "-m", "launcher", "serve", "--model-path", str(folder), "--port", "1"],
        cwd=ROOT,
        env={**os.environ, "QUANTIZATION": "auto"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "selects smoothquant" in r.stderr
