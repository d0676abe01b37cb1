"""`shardserve quantize`: calibrate SmoothQuant for a model and write
`smoothq_model-8bit-auto.safetensors` (layout: layers/quant/smoothquant.py; the calibration
itself, recorder and search: layers/quant/calibration.py; this module drives it).

1. Calibration: a text (built in, or `--calibration-file`) runs through the model in float32 on
   our own model code; every decoder linear records each input channel's largest |activation|
   and a strided sample of its input rows.
2. Layerwise search: per linear, the smoothing strength alpha (0 to 1 in steps of 0.05, or no
   smoothing) with the smallest W8A8 output error on its sample.
3. The file: the checkpoint with each decoder linear replaced by its int8 weight, row scales and
   smoothing vector; everything else copied. `--output-dir` elsewhere also copies the config
   and tokenizer there, so that folder serves on its own.

`--eval` then prints perplexity on the held-out text for none vs smoothquant as served.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger("shardserve.quantize")

# Standard-library docstrings, as for the evaluation text (router/http/quality.py) but from other
# modules, so calibration never sees the text it is judged on.
CALIBRATION_MODULES = (
    "abc", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "copy", "datetime",
    "difflib", "fractions", "glob", "gzip", "hashlib", "hmac", "inspect", "io", "ipaddress",
    "locale", "mailbox", "mimetypes", "numbers", "operator", "optparse", "pprint", "queue",
    "sched", "selectors", "shlex", "struct", "tempfile", "timeit", "tokenize", "traceback",
    "weakref",
)  # fmt: skip


def calibration_text() -> str:
    parts = []
    for name in CALIBRATION_MODULES:
        module = importlib.import_module(name)
        members = [module, *(v for _, v in sorted(vars(module).items()) if callable(v))]
        for m in members:
            doc = inspect.getdoc(m) if getattr(m, "__module__", name) == name else None
            if doc and len(doc) > 200:
                parts.append(doc)
    return "\n\n".join(dict.fromkeys(parts))


def calibrate(llm, token_ids: list[int], window: int, sample_tokens: int, progress: bool):
    from tqdm import tqdm

    from layers.quant.calibration import ActivationRecorder, decoder_linears
    from router.params import GenerationParams

    linears = decoder_linears(llm.worker.model)
    windows = [token_ids[i : i + window] for i in range(0, len(token_ids), window)]
    rec = ActivationRecorder(linears, max(1, len(token_ids) // sample_tokens), sample_tokens)
    try:
        for w in tqdm(windows, desc="calibrating", unit="window", disable=not progress):
            llm.generate([w], GenerationParams(max_tokens=1))
    finally:
        rec.close()
    return {n: (rec.absmax[n], torch.cat(rec.samples[n])) for n in linears}


def write_file(folder: str, path: Path, model, chosen: dict, metadata: dict, progress: bool):
    """The source checkpoint, tensor by tensor, with the decoder linears in their stored form."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from layers.linear import WHOLE
    from layers.quant.calibration import stored_tensors
    from shards.checkpoint import CheckpointReader
    from shards.loader import name_pattern

    rules = model.weight_rules()
    skipped = set(model.skipped_weights())
    out: dict[str, torch.Tensor] = {}
    reader = CheckpointReader(folder)
    for _, name, handle in tqdm(
        reader.tensors(), desc="writing", unit="tensor", disable=not progress
    ):
        pattern, idx = name_pattern(name)
        rule = rules.get(pattern)
        if rule is None and pattern in skipped:
            continue
        module_path, pname = rule.target.rsplit(".", 1) if rule else (None, None)
        module_path = module_path.replace("{i}", idx or "") if module_path else None
        tensor = handle.read(WHOLE)
        if pname == "weight" and module_path in chosen:
            out.update(stored_tensors(name, tensor, chosen[module_path]["smooth"]))
        else:
            out[name] = tensor.contiguous().clone()
    tmp = path.with_name(path.name + ".partial")
    save_file(out, str(tmp), metadata=metadata)
    tmp.replace(path)  # never leave a half-written file under the name serve looks for


def _copy_model_files(src: Path, dst: Path) -> None:
    """Config, tokenizer and generation files: what serves beside the SmoothQuant file."""
    weights = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(weights):
            shutil.copy2(p, dst / p.name)


def quantize(
    folder: str,
    output_dir: str | None = None,
    *,  # the rest by name: two of them are token counts and one a token list
    text: str | None = None,
    token_ids: list[int] | None = None,
    calibration_tokens: int = 4096,
    sample_tokens: int = 256,
    window: int = 512,
    progress: bool = True,
) -> Path:
    """Calibrate on `token_ids`, or on `text` (default: the built-in text) tokenized; search;
    write. Returns the file's path."""
    from launcher.llm import LLM
    from layers.quant.calibration import decoder_linears, search_alphas
    from layers.quant.smoothquant import FORMAT, FORMAT_VERSION, SMOOTHQUANT_FILE
    from shards.model_config import load_model_config

    started = time.monotonic()
    cfg = load_model_config(folder)
    with LLM(
        folder,
        dtype="float32",
        fast_kernels=False,  # the plain float weights are what the search quantizes
        enable_prefix_caching=False,
        max_num_batched_tokens=window,
        max_model_len=2 * window,
        kv_cache_memory=2**28,
        progress=progress,
        load_tokenizer=token_ids is None,
        cpu_compile=False,  # prompts only: no decode step runs
    ) as llm:
        ids = token_ids or llm.tokenizer.encode(text or calibration_text())
        ids = ids[:calibration_tokens]
        if len(ids) < 2 * window:
            raise ValueError(f"calibration text has {len(ids)} tokens; at least {2 * window}")
        log.info("calibrating on %d tokens in windows of %d", len(ids), window)
        stats = calibrate(llm, ids, window, sample_tokens, progress)
        chosen = search_alphas(decoder_linears(llm.worker.model), stats, progress)
        dst = Path(output_dir or folder)
        if dst.resolve() != Path(folder).resolve():
            _copy_model_files(Path(folder), dst)
        metadata = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "architecture": cfg.architecture,
            "hidden_size": str(cfg.hidden_size),
            "num_hidden_layers": str(cfg.num_hidden_layers),
            "vocab_size": str(cfg.vocab_size),
            "calibration_tokens": str(len(ids)),
            "alpha": json.dumps({n: c["alpha"] for n, c in chosen.items()}),
        }
        path = dst / SMOOTHQUANT_FILE
        write_file(folder, path, llm.worker.model, chosen, metadata, progress)
    gain = [c["error_unsmoothed"] / max(c["error"], 1e-30) for c in chosen.values()]
    log.info(
        "wrote %s (%.1f MiB) in %.1fs; smoothing cut the W8A8 error of %d linears by %.2fx "
        "(median; alpha range %s)",
        path,
        path.stat().st_size / 2**20,
        time.monotonic() - started,
        len(chosen),
        sorted(gain)[len(gain) // 2],
        _alpha_range(chosen),
    )
    return path


def _alpha_range(chosen: dict) -> str:
    alphas = sorted(c["alpha"] for c in chosen.values() if c["alpha"] is not None)
    off = sum(c["alpha"] is None for c in chosen.values())
    span = f"{alphas[0]}-{alphas[-1]}" if alphas else "none"
    return f"{span}, {off} unsmoothed"


def evaluate(source: str, quantized: str, eval_tokens: int) -> dict[str, float]:
    """Held-out perplexity of the float model and of the SmoothQuant file, as served."""
    from launcher.llm import LLM
    from router.http.quality import eval_tokens as held_out
    from router.http.quality import perplexity

    ppl = {}
    for mode, folder in (("none", source), ("smoothquant", quantized)):
        # prompts only: no decode step runs, so none is compiled
        with LLM(
            folder,
            quantization=mode,
            kv_cache_memory=2**28,
            max_model_len=4096,
            cpu_compile=False,
        ) as llm:
            ppl[mode] = perplexity(llm, held_out(llm.tokenizer, eval_tokens))
    return ppl


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardserve quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model-path", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--output-dir", default=None, help="where to write (default: the model folder)")
    p.add_argument("--calibration-file", default=None, help="a UTF-8 text to calibrate on")
    p.add_argument("--calibration-tokens", type=int, default=4096)
    p.add_argument("--sample-tokens", type=int, default=256, help="rows per linear for the search")
    p.add_argument(
        "--eval", action="store_true", help="print held-out perplexity, none vs smoothquant"
    )
    p.add_argument("--eval-tokens", type=int, default=2048)
    args = p.parse_args(argv)
    from launcher.embedded import ensure_embedded_model

    folder = args.model_path or str(ensure_embedded_model())
    text = None
    if args.calibration_file:
        text = Path(args.calibration_file).read_text(encoding="utf-8")
    path = quantize(
        folder,
        args.output_dir,
        text=text,
        calibration_tokens=args.calibration_tokens,
        sample_tokens=args.sample_tokens,
    )
    if args.eval:
        ppl = evaluate(folder, str(path.parent), args.eval_tokens)
        delta = ppl["smoothquant"] / ppl["none"] - 1
        print(f"held-out perplexity ({args.eval_tokens} tokens): none {ppl['none']:.4f}, "
              f"smoothquant {ppl['smoothquant']:.4f} ({delta:+.2%})")  # fmt: skip
    return 0
