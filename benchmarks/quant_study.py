"""`python -m benchmarks.quant_study`: how far other ways of choosing fp8 and NF4 values move the
embedded model's perplexity, against the formats as served (BENCHMARKS.md, *Quantization*).

Each variant rounds the decoder linears of transformers' own model (fake quantization: the
rounded weights stay float), then scores the same 2,048 tokens as `shardserve bench-quant`
(router/http/quality.py). Variants that need data read the decoder linears' input Gram matrices
(X^T X) from the smoothquant calibration text (launcher/quantize.py, 4,096 tokens), the
statistics GPTQ and activation-aware scale searches use. A study, not a serving mode: it says
what a calibrated NF4 could reach on this model, whose weights were rounded to Q4_1 before.
"""

from __future__ import annotations

import argparse
import math
import types

import torch

from benchmarks.common import write_report

GROUP = 64


def _nf4_round(groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from layers.quant.dequant import NF4_LEVELS

    mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
    return NF4_LEVELS[torch.bucketize(groups / scale[..., None], mids)] * scale[..., None]


def nf4_absmax(w: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """As served (layers/quant/dequant.py)."""
    g = w.view(w.shape[0], -1, group)
    return _nf4_round(g, g.abs().amax(2).clamp(min=1e-12)).view_as(w)


def nf4_searched_scales(w: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """[out, groups] scales: absmax times the factor in [0.5, 1.1] with the least squared
    error, each input weighted by `weight` (mean squared activation) when given."""
    g = w.view(w.shape[0], -1, GROUP)
    absmax = g.abs().amax(2).clamp(min=1e-12)
    per_input = torch.ones(1, 1, GROUP) if weight is None else weight.view(1, -1, GROUP)
    best, best_scale = None, absmax
    for f in torch.linspace(0.5, 1.1, 61):
        err = ((_nf4_round(g, absmax * f) - g) ** 2 * per_input).sum(2)
        if best is None:
            best, best_scale = err, absmax * f
        else:
            better = err < best
            best = torch.where(better, err, best)
            best_scale = torch.where(better, absmax * f, best_scale)
    return best_scale


def gptq(w: torch.Tensor, gram: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """NF4 g64 with GPTQ's error feedback: columns rounded in order, each one's error spread
    over the columns not yet rounded through the inverse Gram's Cholesky factor (in blocks of
    128 columns, updating the rest once per block). `scales`: [out, groups] fixed up front,
    or None for each group's absmax when its first column comes."""
    W = w.double().clone()
    n = W.shape[1]
    H = gram.clone()
    H += 0.01 * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for b0 in range(0, n, 128):
        b1 = min(b0 + 128, n)
        block, errors = W[:, b0:b1].clone(), torch.zeros(W.shape[0], b1 - b0, dtype=W.dtype)
        for j in range(b1 - b0):
            col = b0 + j
            if col % GROUP == 0:
                ahead = torch.cat([block[:, j:], W[:, b1:]], 1)[:, :GROUP]
                s = ahead.abs().amax(1) if scales is None else scales[:, col // GROUP]
                s = s.float().clamp(min=1e-12)
            q = _nf4_round(block[:, j, None, None].float(), s[:, None]).flatten().double()
            Q[:, col] = q
            err = (block[:, j] - q) / U[col, col]
            block[:, j:] -= err[:, None] * U[col, col:b1][None, :]
            errors[:, j] = err
        W[:, b1:] -= errors @ U[b0:b1, b1:]
    return Q.float()


def fp8_absmax(w: torch.Tensor) -> torch.Tensor:
    from layers.quant.dequant import FP8_MAX

    s = (w.abs().amax(1) / FP8_MAX).clamp(min=1e-12)[:, None]
    return (w / s).to(torch.float8_e4m3fn).float() * s


def fp8_searched(w: torch.Tensor) -> torch.Tensor:
    """As served: layers/quant/dequant.fp8_scales."""
    from layers.quant.dequant import fp8_scales

    s = fp8_scales(types.SimpleNamespace(split=None), w)[:, None]
    return (w / s).to(torch.float8_e4m3fn).float() * s


def _linears(model) -> dict[str, torch.nn.Linear]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    }


@torch.no_grad()
def _perplexity(model, ids: list[int], window: int = 1024) -> float:
    nll, count = 0.0, 0
    for i in range(0, len(ids), window):
        w = torch.tensor([ids[i : i + window]])
        logp = torch.log_softmax(model(w).logits[0, :-1].float(), -1)
        nll -= logp.gather(1, w[0, 1:, None]).sum().item()
        count += w.shape[1] - 1
    return math.exp(nll / count)


@torch.no_grad()
def _grams(model, ids: list[int]) -> dict[str, torch.Tensor]:
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in _linears(model).items()]
    for i in range(0, len(ids), 1024):
        model(torch.tensor([ids[i : i + 1024]]))
    for h in handles:
        h.remove()
    return grams


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--sensitivity", action="store_true",
                   help="also: absmax NF4 on one kind of linear at a time")  # fmt: skip
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.embedded import ensure_embedded_model
    from launcher.quantize import calibration_text
    from router.http.quality import eval_tokens

    folder = str(ensure_embedded_model())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = eval_tokens(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    original = {n: m.weight.data.clone() for n, m in _linears(model).items()}
    grams = _grams(model, tokenizer.encode(calibration_text())[:4096])
    act = {n: g.diagonal().float() for n, g in grams.items()}  # per-input sum of squares
    variants = {
        "none": lambda n, w: w,
        "fp8 absmax scales": lambda n, w: fp8_absmax(w),
        "fp8 searched scales (served)": lambda n, w: fp8_searched(w),
        "nf4 g64 absmax (served)": lambda n, w: nf4_absmax(w),
        "nf4 g64 least-error scales": lambda n, w: _nf4_with(w, nf4_searched_scales(w)),
        "nf4 g32 absmax": lambda n, w: nf4_absmax(w, 32),
        "nf4 g64 GPTQ, absmax": lambda n, w: gptq(w, grams[n], None),
        "nf4 g64 activation-weighted scales": lambda n, w: _nf4_with(
            w, nf4_searched_scales(w, act[n])
        ),
        "nf4 g64 GPTQ + activation-weighted scales": lambda n, w: gptq(
            w, grams[n], nf4_searched_scales(w, act[n])
        ),
    }
    report, base = {}, None
    for name, fn in variants.items():
        for n, m in _linears(model).items():
            m.weight.data = fn(n, original[n])
        ppl = _perplexity(model, ids)
        base = base or ppl
        report[name] = {"perplexity": ppl, "vs_none": ppl / base - 1}
        print(f"{name:45s} {ppl:8.4f} {ppl / base - 1:+8.2%}", flush=True)
    if args.sensitivity:
        for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            for n, m in _linears(model).items():
                m.weight.data = nf4_absmax(original[n]) if n.endswith(kind) else original[n]
            ppl = _perplexity(model, ids)
            report[f"nf4 {kind} only"] = {"perplexity": ppl, "vs_none": ppl / base - 1}
            print(f"{'nf4 g64 absmax, ' + kind + ' only':45s} {ppl:8.4f} {ppl / base - 1:+8.2%}")
    write_report("", report, args.json)
    return 0


def _nf4_with(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return _nf4_round(w.view(w.shape[0], -1, GROUP), scales).view_as(w)


if __name__ == "__main__":
    raise SystemExit(main())
