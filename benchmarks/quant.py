"""`shardserve bench-quant`: every built quantization mode on one model, in one run: weight
memory, perplexity on the fixed evaluation text, single-stream and 16-prompt decode tok/s.
A mode may name its compute dtype, `none:float32` (default: the server's for this CPU)."""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

from benchmarks.common import write_report
from benchmarks.shapes import add_model_args, model_folder

log = logging.getLogger("shardserve.bench")

MODES = ("none", "ifq", "smoothquant", "fp8", "ifq_nf4")


def _measure(model: str, spec: str, args) -> dict:
    from launcher.llm import LLM
    from router.http.quality import eval_tokens, perplexity
    from router.params import GenerationParams
    from shards.wire import SamplingParams

    greedy = SamplingParams(temperature=0.0)
    params = GenerationParams(max_tokens=args.max_tokens, sampling=greedy, ignore_eos=True)
    mode, _, dtype = spec.partition(":")
    with LLM(
        model, quantization=mode, dtype=dtype or None, kv_cache_memory=2**29, max_model_len=4096
    ) as llm:
        tokens = eval_tokens(llm.tokenizer, args.eval_tokens)
        ppl = perplexity(llm, tokens)
        prompts = [llm.encode_chat([{"role": "user", "content": f"Tell me about topic {i}."}])
                   for i in range(args.batch)]  # fmt: skip
        llm.generate([prompts[0]], GenerationParams(max_tokens=4, sampling=greedy))  # warm-up
        t = time.perf_counter()
        llm.generate([prompts[0]], params)
        single = args.max_tokens / (time.perf_counter() - t)
        t = time.perf_counter()
        llm.generate(prompts, params)
        batch = args.batch * args.max_tokens / (time.perf_counter() - t)
        out = {
            "weight_mib": llm.info.weight_bytes / 2**20,
            "perplexity": ppl,
            "single_tok_s": single,
            "batch_tok_s": batch,
        }
    log.info("%s: %s", spec, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardserve bench-quant", description=__doc__)
    add_model_args(p)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    model = model_folder(args)
    specs = args.modes.split(",")
    folders = {m: model for m in specs}
    with tempfile.TemporaryDirectory() as tmp:
        if any(m.partition(":")[0] == "smoothquant" for m in specs):  # calibrated beside, so
            from launcher.quantize import quantize  # the model folder stays as it was

            calibrated = str(quantize(model, tmp).parent)
            folders.update({m: calibrated for m in specs if m.startswith("smoothquant")})
        report = {m: _measure(folders[m], m, args) for m in specs}
    base = next((r for m, r in report.items() if m.partition(":")[0] == "none"), None)
    batch_col = f"{args.batch} prompts tok/s"
    lines = [
        f"{'mode':16s} {'weights MiB':>12s} {'perplexity':>11s} {'vs none':>8s} "
        f"{'single tok/s':>13s} {'vs none':>8s} {batch_col:>18s} {'vs none':>8s}"
    ]
    for mode, r in report.items():
        rel = {k: r[k] / base[k] if base else float("nan") for k in r}
        lines.append(
            f"{mode:16s} {r['weight_mib']:12.1f} {r['perplexity']:11.4f} "
            f"{(rel['perplexity'] - 1) * 100:+7.2f}% {r['single_tok_s']:13.1f} "
            f"{rel['single_tok_s']:7.2f}x {r['batch_tok_s']:18.1f} {rel['batch_tok_s']:7.2f}x"
        )
    write_report("\n".join(lines), report, args.json)
    return 0
