"""`shardserve` and `python -m launcher`: serve, chat, bench, bench-engine."""

from __future__ import annotations

import logging
import sys

COMMANDS = {
    "serve": "serve a model with the OpenAI-compatible API (default)",
    "chat": "chat with a running server, streamed, multi-turn",
    "bench": "load a running OpenAI-compatible server; latency percentiles and throughput",
    "bench-engine": "offline engine benchmark against transformers generate",
    "bench-serve": "server benchmark against transformers serve, in one run",
    "bench-quant": "quantization modes: weight memory, perplexity, decode tok/s",
    "bench-tp": "tensor-parallel overhead: TP=2 vs TP=1 step time and collective cost",
}


def _usage() -> str:
    lines = ["usage: shardserve COMMAND [options]", "", "commands:"]
    lines += [f"  {name:14s} {text}" for name, text in COMMANDS.items()]
    lines += ["", "`shardserve COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    command = "serve"
    if argv and not argv[0].startswith("-"):
        command = argv.pop(0)
    elif argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if command == "serve":
        from launcher.serve import serve

        return serve(argv)
    if command == "chat":
        from clients.chat import main as chat

        return chat(argv)
    if command == "bench":
        from clients.bench import main as bench

        return bench(argv)
    if command == "bench-serve":
        from launcher.bench_serve import main as bench_serve

        return bench_serve(argv)
    if command == "bench-quant":
        from launcher.bench_quant import main as bench_quant

        return bench_quant(argv)
    if command == "bench-tp":
        from launcher.bench_tp import main as bench_tp

        return bench_tp(argv)
    if command == "bench-engine":
        from launcher.bench_engine import main as bench

        return bench(argv)
    print(f"unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
