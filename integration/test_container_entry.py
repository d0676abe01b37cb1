"""The container image's entry points, run outside a container with the same environment:
`docker/run` (the vendor image's `run`) and the spec's vLLM-style command line through the
image's compatibility module (docker/compat on PYTHONPATH)."""

from __future__ import annotations

import subprocess
import sys

import httpx

from integration.conftest import ROOT, Server

RUN = str(ROOT / "docker" / "run")
SPEC_FLAGS = ["--model-path", "--num-gpus", "--worker-num", "--limit-worker-concurrency",
              "--dtype", "--seed", "--max-model-len", "--quantization", "--use-lookahead",
              "--num-speculative-tokens", "--gpu_memory_utilization", "--enforce-eager",
              "--ds-dtype", "--max-batch-size", "--batch-wait-timeout"]  # fmt: skip
SPEC_ENV = ["MODEL_PATH", "TP", "WORKER_NUM", "MAX_CONCURRENCY", "DTYPE", "SEED", "MODEL_ID",
            "CONV_TEMPLATE", "QUANTIZATION", "USE_LOOKAHEAD", "NUM_SPECULATIVE_TOKENS",
            "GPU_MEMORY_UTILIZATION", "ENFORCE_EAGER", "DS_DTYPE", "MAX_BATCH_SIZE",
            "BATCH_WAIT_TIMEOUT", "OPENAI_API_KEYS"]  # fmt: skip


def test_run_lists_every_spec_parameter_and_variable():
    out = subprocess.run([RUN, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps lines
    for flag in SPEC_FLAGS:
        assert flag in text, flag
    for env in SPEC_ENV:
        assert f"env {env}" in text, env


def _serve(tmp_path, command: list[str], args: list[str], env: dict) -> Server:
    return Server(args, env, tmp_path / "server.log", command=command).wait_ready()


def test_run_serves_from_the_spec_environment(tmp_path, tiny_folder):
    env = {"MODEL_PATH": str(tiny_folder), "MODEL_ID": "from-env", "MAX_CONCURRENCY": "3",
           "KV_CACHE_MEMORY": "64MiB"}  # fmt: skip
    server = _serve(tmp_path, [RUN], [], env)
    try:
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["from-env"]
        assert server.stats()["max_concurrency"] == 3
    finally:
        assert server.stop() == 0


def test_the_spec_vllm_command_line_serves_through_run(tmp_path, tiny_folder):
    # `docker run IMAGE python3 -m vllm...`: the entry point runs a command given instead of
    # parameters
    command = [RUN, sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    args = ["--model", str(tiny_folder), "--served-model-name", "model", "--trust-remote-code",
            "--use-v2-block-manager", "--kv-cache-memory", "64MiB"]  # fmt: skip
    server = _serve(tmp_path, command, args, {"PYTHONPATH": str(ROOT / "docker" / "compat")})
    try:
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["model"]
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        assert server.stop() == 0
