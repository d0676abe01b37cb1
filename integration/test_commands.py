"""Every `shardserve` subcommand run as a user runs it: the installed console script in a
subprocess, on a tiny checkpoint with the embedded model's tokenizer, at its smallest settings,
judged by the files it writes and the figures it prints. (`serve` is what every integration
test starts; `chat` and `bench` are also driven in process in test_clients.py.)"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import httpx
import pytest

from integration.conftest import ROOT, SHARDSERVE, start_server
from launcher.cli import COMMANDS
from tests.support.tiny import build_hf_model, save_checkpoint, tiny_config

# Each command and the test that runs it; a command added to the CLI without one fails below.
TESTED = {
    "serve": "integration/conftest.py (every server)",
    "chat": "test_chat_answers_piped_input",
    "bench": "test_bench_writes_its_report",
    "quantize": "test_quantize_writes_a_folder_that_serves_with_smoothquant",
    "bench-engine": "test_bench_engine",
    "bench-serve": "test_bench_serve",
    "bench-soak": "test_bench_soak",
    "bench-quant": "test_bench_quant",
    "bench-lookahead": "test_bench_lookahead",
    "bench-gpu": "test_bench_gpu",
    "bench-tp": "test_bench_tp",
    "bench-kernels": "test_bench_kernels",
}


def test_every_command_has_a_test():
    assert set(COMMANDS) == set(TESTED)


def shardserve(*args: str, timeout: float = 900, stdin: str | None = None) -> str:
    """Run the console script; its stdout, after asserting it exited 0."""
    proc = subprocess.run(
        [SHARDSERVE, *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout


@pytest.fixture(scope="module")
def model(tmp_path_factory, embedded_folder) -> str:
    """A tiny random Llama with the embedded tokenizer and a 4,096-token context (calibration
    and evaluation windows need more than the shared tiny model's 512)."""
    hf = build_hf_model(
        tiny_config("llama", vocab_size=49152, eos_token_id=2, max_position_embeddings=4096)
    )
    folder = save_checkpoint(hf, tmp_path_factory.mktemp("commands") / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (embedded_folder / name).exists():
            shutil.copy(embedded_folder / name, folder / name)
    return str(folder)


def test_chat_answers_piped_input(tiny_server):
    out = shardserve("chat", "--server", tiny_server.url, "--max-tokens", "8", stdin="hi\n/exit\n")
    reply = out.split("Assistant: ", 1)[1].split("\n", 1)[0]
    assert reply.strip(), out


def test_bench_writes_its_report(tiny_server, tmp_path):
    path = tmp_path / "bench.json"
    out = shardserve("bench", "--url", tiny_server.url, "--concurrency", "2", "--requests", "4",
                     "--max-tokens", "8", "--json", str(path), "--no-progress")  # fmt: skip
    report = json.loads(path.read_text())
    assert report["requests"] == {"total": 4, "ok": 4, "failed": 0}
    assert report["output_tokens"] == 4 * 8 and "tok/s" in out


def test_quantize_writes_a_folder_that_serves_with_smoothquant(tmp_path_factory, model):
    """As the README's Quantization section shows it."""
    out_dir = tmp_path_factory.mktemp("smoothquant") / "model-smoothquant"
    out = shardserve("quantize", "--model-path", model, "--output-dir", str(out_dir), "--eval")
    names = {p.name for p in out_dir.iterdir()}
    assert "smoothq_model-8bit-auto.safetensors" in names and "config.json" in names
    assert "tokenizer.json" in names and not any(n.startswith("model") for n in names)
    m = re.search(r"none (\d+\.\d+), smoothquant (\d+\.\d+)", out)
    assert m, out
    none, smoothquant = float(m[1]), float(m[2])
    assert abs(smoothquant / none - 1) < 0.01, out
    args = ["--model-path", str(out_dir), "--quantization", "smoothquant"]
    server = start_server(tmp_path_factory, "quantized", [*args, "--kv-cache-memory", "64MiB"])
    try:
        body = {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "ignore_eos": True,
        }
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        assert "smoothquant" in server.logs()
    finally:
        server.stop()


def test_bench_engine(model, tmp_path):
    path = tmp_path / "engine.json"
    out = shardserve("bench-engine", "--model", model, "--max-tokens", "8", "--batch", "2",
                     "--prefill-tokens", "64", "--rounds", "1", "--variants", "eager,compiled-ifq",
                     "--json", str(path))  # fmt: skip
    report = json.loads(path.read_text())
    assert set(report["ours"]) == {"eager", "compiled-ifq"}
    for figures in [*report["ours"].values(), report["transformers"]]:
        assert all(figures[k] > 0 for k in ("single_tok_s", "batch_tok_s", "prefill_tok_s"))
    assert "single-stream decode" in out


def test_bench_serve(model, tmp_path):
    path = tmp_path / "serve.json"
    shardserve("bench-serve", "--model", model, "--concurrency", "2", "--max-tokens", "8",
               "--prompt-tokens", "16", "--long-prompt-tokens", "64", "--min-requests", "2",
               "--skip-transformers", "--json", str(path))  # fmt: skip
    loads = json.loads(path.read_text())["servers"]["ours none"]
    assert set(loads) == {"concurrency 2", "64-token prompt TTFT"}
    for load in loads.values():
        assert load["requests"]["failed"] == 0 and load["output_tokens"] > 0, load["errors"]


def test_bench_soak(model, tmp_path):
    path = tmp_path / "soak.json"
    out = shardserve("bench-soak", "--model", model, "--minutes", "0.05", "--concurrency", "2",
                     "--requests-per-round", "4", "--max-tokens", "8", "--prompt-tokens", "16",
                     "--json", str(path))  # fmt: skip
    report = json.loads(path.read_text())
    assert report["rounds"] >= 1 and report["failed"] == 0
    assert report["completed"] == 4 * report["rounds"] and "PASS" in out


def test_bench_quant(model, tmp_path):
    path = tmp_path / "quant.json"
    shardserve("bench-quant", "--model", model, "--modes", "none:float32,ifq,smoothquant",
               "--max-tokens", "8", "--batch", "2", "--eval-tokens", "256",
               "--json", str(path))  # fmt: skip
    report = json.loads(path.read_text())
    assert set(report) == {"none:float32", "ifq", "smoothquant"}
    base = report["none:float32"]
    for mode, r in report.items():
        assert math.isfinite(r["perplexity"]) and r["single_tok_s"] > 0, mode
        assert abs(r["perplexity"] / base["perplexity"] - 1) < 0.01, mode
    assert report["ifq"]["weight_mib"] < base["weight_mib"]


def test_bench_lookahead(model, tmp_path):
    path = tmp_path / "lookahead.json"
    # float32: identity with plain decoding is exact up to summation order there; in bfloat16
    # (this CPU's default) trees verified through SDPA and plain compiled steps can part at a
    # near-tie of the logits' 8 bits
    shardserve("bench-lookahead", "--model", model, "--max-tokens", "8", "--rounds", "1",
               "--dtype", "float32", "--json", str(path))  # fmt: skip
    report = json.loads(path.read_text())
    assert set(report) == {"rag", "chat", "mixed", "chat16"}
    for name, r in report.items():
        assert r["identical_output"] and r["plain_tok_s"] > 0 and r["lookahead_tok_s"] > 0, name


def test_bench_tp(tmp_path):
    path = tmp_path / "tp.json"
    shardserve("bench-tp", "--hidden", "128", "--layers", "2", "--vocab", "512",
               "--max-tokens", "4", "--batch", "2", "--json", str(path))  # fmt: skip
    report = json.loads(path.read_text())
    for tp in ("tp1", "tp2"):
        assert all(r["step_ms"] > 0 for r in report[tp].values()), report[tp]
    assert report["collectives"]["plan broadcast us"] > 0


def test_bench_kernels(tmp_path):
    path = tmp_path / "kernels.json"
    out = shardserve("bench-kernels", "--shapes", "smollm2-135m", "--total-mib", "8",
                     "--json", str(path))  # fmt: skip
    rows = json.loads(path.read_text())["shapes"]["smollm2-135m"]
    assert set(rows) == {"qkv", "o", "gate_up", "down", "lm_head"}
    for name, r in rows.items():
        paths = {p: v for p, v in r.items() if p != "shape"}
        assert {"float32", "bfloat16", "int8 fused", "int8 onednn"} <= set(paths), name
        assert all(v > 0 for v in paths.values()), (name, paths)
    assert "GB/s of weight bytes" in out
    # a prompt chunk's rows: arithmetic rates, without the paths that take a few rows only
    out = shardserve("bench-kernels", "--shapes", "smollm2-135m", "--total-mib", "8", "--rows",
                     "40", "--json", str(path))  # fmt: skip
    rows = json.loads(path.read_text())["shapes"]["smollm2-135m"]
    assert "int8 fused" not in rows["qkv"] and "int8 kernel" not in rows["qkv"]
    assert rows["qkv"]["int8 onednn"] > 0
    assert "GFLOP/s" in out


def test_bench_gpu(tmp_path):
    """Measures CUDA kernels and graphs only: on a machine without a GPU it says so and fails."""
    import torch

    args = [SHARDSERVE, "bench-gpu", "--batches", "1", "--max-tokens", "8", "--modes", "none",
            "--json", str(tmp_path / "gpu.json")]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=900)
    if torch.cuda.is_available():
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert json.loads((tmp_path / "gpu.json").read_text())["modes"]
    else:
        assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr
