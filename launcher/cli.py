"""`shardserve` and `python -m launcher`: serve, chat, and the load and benchmark commands."""

from __future__ import annotations

import importlib
import sys

from shards import logs

# name → (module, function, help); imported only when run, so `serve` never loads a benchmark
COMMANDS = {
    "serve": ("launcher.serve", "serve", "serve a model with the OpenAI-compatible API (default)"),
    "chat": ("clients.chat", "main", "chat with a running server, streamed, multi-turn"),
    "bench": (
        "clients.bench",
        "main",
        "load a running OpenAI-compatible server; latency percentiles and throughput",
    ),
    "bench-engine": (
        "benchmarks.engine",
        "main",
        "offline engine benchmark against transformers generate",
    ),
    "bench-serve": (
        "benchmarks.serve",
        "main",
        "server benchmark against transformers serve, in one run",
    ),
    "bench-soak": (
        "benchmarks.soak",
        "main",
        "long steady load at concurrency 64: failures and memory growth",
    ),
    "bench-quant": (
        "benchmarks.quant",
        "main",
        "quantization modes: weight memory, perplexity, decode tok/s",
    ),
    "quantize": (
        "launcher.quantize",
        "main",
        "calibrate SmoothQuant and write smoothq_model-8bit-auto.safetensors",
    ),
    "bench-lookahead": (
        "benchmarks.lookahead",
        "main",
        "lookahead vs plain decoding: RAG, chat and 16 mixed, with acceptance",
    ),
    "bench-gpu": (
        "benchmarks.gpu",
        "main",
        "GPU decode tok/s per quant mode, eager and CUDA graphs, against the roofline",
    ),
    "bench-kernels": (
        "benchmarks.kernels",
        "main",
        "GB/s of weight bytes per linear shape: float, bfloat16 and the int8 paths",
    ),
    "bench-tp": (
        "benchmarks.tp",
        "main",
        "tensor-parallel overhead: TP=2 vs TP=1 step time and collective cost",
    ),
}


def _usage() -> str:
    lines = ["usage: shardserve COMMAND [options]", "", "commands:"]
    lines += [f"  {name:14s} {entry[2]}" for name, entry in COMMANDS.items()]
    lines += ["", "`shardserve COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logs.configure()
    command = "serve"
    if argv and not argv[0].startswith("-"):
        command = argv.pop(0)
    elif argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[command]
    return getattr(importlib.import_module(module), function)(argv)


if __name__ == "__main__":
    sys.exit(main())
