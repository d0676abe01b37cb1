"""`shardserve bench-lookahead`: lookahead vs plain greedy decoding on the offline engine, in one
run: (a) RAG-style, a ~1,000-token document and a request whose answer quotes it, one at a time;
(b) ordinary chat prompts, one at a time; (c) 16 at once, half of each; (d) 16 different chat
prompts at once, where drafts rarely pay. Output tok/s of each
against plain (end to end, and after each request's first token: the decode phase, which is
what lookahead changes), the draft acceptance rate and the mean accepted tokens per
verification.

Each mode runs in a fresh engine after a warm-up on other prompts (the kernels' first call at a
new batch shape is slow on CPU), so neither mode inherits the other's prefix cache or drafts;
`--rounds` repeats both in alternating order and reports medians (this host's speed drifts by
10-20 % between minutes).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import statistics
import time

from benchmarks.common import write_report
from benchmarks.shapes import add_model_args, model_folder

log = logging.getLogger("shardserve.bench")

# (document modules, request): standard-library prose cut to at most 1,000 tokens. The measured
# ones are documents this 135M model does quote when asked (for most others it paraphrases or
# writes code, and there is nothing to look ahead to); the first warms the engine up.
QUOTE = "Repeat the text above verbatim, starting from its first line."
RAG = (
    (("json", "csv"), QUOTE),
    (("pdb",), QUOTE),
    (("turtle",), QUOTE),
    (("wave",), QUOTE),
    (("statistics",), QUOTE),
)
CHAT = (
    "Tell me about the history of the bicycle.",
    "Write a short poem about the sea.",
    "Explain how a refrigerator works.",
    "What are three tips for learning a new language?",
)
# (d): sixteen different chat requests at once, where drafts rarely pay: lookahead must not
# make them slower
CHAT_16 = CHAT[1:] + (
    "Describe a sunset over the mountains.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What is machine learning?",
    "How do airplanes stay in the air?",
    "Write a limerick about a cat.",
    "What should I pack for a weekend hike?",
    "Explain photosynthesis to a child.",
    "What are the benefits of regular exercise?",
    "How does a compass work?",
    "Suggest a name for a coffee shop.",
    "Summarize the plot of Romeo and Juliet.",
    "What is the difference between weather and climate?",
)


def _document(modules: tuple[str, ...], tokenizer, max_tokens: int = 1000) -> str:
    text = "\n\n".join(inspect.getdoc(importlib.import_module(m)) or "" for m in modules)
    return tokenizer.decode(tokenizer.encode(text)[:max_tokens])


def _prompts(llm) -> dict[str, list[list[int]]]:
    rag = [
        llm.encode_chat([{"role": "user", "content": f"{_document(m, llm.tokenizer)}\n\n{q}"}])
        for m, q in RAG
    ]
    chat = [llm.encode_chat([{"role": "user", "content": c}]) for c in CHAT]
    mixed = (rag[1:] * 4)[:8] + (chat[1:] * 3)[:8]
    chat16 = [llm.encode_chat([{"role": "user", "content": c}]) for c in CHAT_16]
    # warm-up on the first of each kind; measure on the others
    return {
        "warmup": [rag[0], chat[0]],
        "rag": rag[1:],
        "chat": chat[1:],
        "mixed": mixed,
        "chat16": chat16,
    }


def _draft_counts(s) -> tuple[int, int, int]:
    return s.num_draft_proposed, s.num_draft_accepted, s.num_draft_steps


def _measure(folder: str, lookahead: bool, args) -> dict:
    from launcher.llm import LLM
    from router.params import GenerationParams
    from shards.wire import SamplingParams

    params = GenerationParams(max_tokens=args.max_tokens, sampling=SamplingParams(temperature=0.0))
    out = {}
    with LLM(folder, kv_cache_memory=2**29, max_model_len=4096, use_lookahead=lookahead,
             num_speculative_tokens=args.depth, quantization=args.quantization,
             device=args.device, enforce_eager=args.enforce_eager,
             dtype=args.dtype) as llm:  # fmt: skip
        prompts = _prompts(llm)
        llm.generate(prompts["warmup"], params)
        for name in ("rag", "chat", "mixed", "chat16"):
            before = _draft_counts(llm.scheduler)
            t = time.perf_counter()
            if name in ("mixed", "chat16"):
                done = llm.generate(prompts[name], params)
            else:  # concurrency 1: one request after the other
                done = [c for p in prompts[name] for c in llm.generate([p], params)]
            seconds = time.perf_counter() - t
            proposed, accepted, steps = (
                now - b for now, b in zip(_draft_counts(llm.scheduler), before)
            )
            decode_s = sum(c.last_token_at - c.first_token_at for c in done if c.token_ids)
            out[name] = {
                "tok_s": sum(len(c.token_ids) for c in done) / seconds,
                # after each request's first token: the part lookahead can speed up (the
                # prompt's prefill is the same work either way)
                "decode_tok_s": sum(len(c.token_ids) - 1 for c in done) / decode_s,
                "tokens": [c.token_ids for c in done],
                "acceptance": accepted / proposed if proposed else 0.0,
                "accepted_per_verify": accepted / steps if steps else 0.0,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardserve bench-lookahead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_model_args(p)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--depth", type=int, default=8, help="NUM_SPECULATIVE_TOKENS")
    p.add_argument("--quantization", default="none", help="QUANTIZATION for both runs")
    p.add_argument("--dtype", default="auto", help="DTYPE for both runs (auto: the default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--enforce-eager", type=int, default=1, help="0: CUDA graphs for plain decode steps"
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="fresh engines per mode, alternating; medians"
    )
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    folder = model_folder(args)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for r in range(args.rounds):  # alternate which mode goes first: the host drifts
        for lookahead in (False, True) if r % 2 == 0 else (True, False):
            runs[lookahead].append(_measure(folder, lookahead, args))
            log.info("round %d/%d, lookahead=%s done", r + 1, args.rounds, lookahead)
    lines = [f"{'workload':22s} {'plain tok/s':>12s} {'lookahead':>10s} {'ratio':>7s} "
             f"{'decode ratio':>13s} {'accepted':>9s} {'per verify':>11s} "
             f"{'same output':>12s}"]  # fmt: skip
    report = {}
    titles = {
        "rag": "(a) RAG, c=1",
        "chat": "(b) chat, c=1",
        "mixed": "(c) 16 mixed at once",
        "chat16": "(d) 16 chats at once",
    }
    for name, title in titles.items():
        plain = [run[name] for run in runs[False]]
        ahead = [run[name] for run in runs[True]]
        med = {
            (mode, key): statistics.median(x[key] for x in rows)
            for mode, rows in (("plain", plain), ("lookahead", ahead))
            for key in ("tok_s", "decode_tok_s", "acceptance", "accepted_per_verify")
        }
        same = all(x["tokens"] == plain[0]["tokens"] for x in plain + ahead)
        entry = {f"{mode}_{key}": v for (mode, key), v in med.items()}
        entry["ratio"] = med["lookahead", "tok_s"] / med["plain", "tok_s"]
        entry["decode_ratio"] = med["lookahead", "decode_tok_s"] / med["plain", "decode_tok_s"]
        entry["round_ratios"] = [b["tok_s"] / a["tok_s"] for a, b in zip(plain, ahead)]
        entry["identical_output"] = same
        report[name] = entry
        lines.append(
            f"{title:22s} {med['plain', 'tok_s']:12.1f} {med['lookahead', 'tok_s']:10.1f} "
            f"{entry['ratio']:6.2f}x {entry['decode_ratio']:12.2f}x "
            f"{med['lookahead', 'acceptance']:8.0%} "
            f"{med['lookahead', 'accepted_per_verify']:11.2f} {str(same):>12s}"
        )
    write_report("\n".join(lines), report, args.json)
    return 0
