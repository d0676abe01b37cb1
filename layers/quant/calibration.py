"""SmoothQuant calibration of the decoder linears (the mode itself: smoothquant.py): what
`shardserve quantize` records while a calibration text runs through the model, and the
layerwise search that picks each linear's smoothing strength from it.

- `ActivationRecorder`: forward pre-hooks on every `ParallelLinear`, keeping each input
  channel's largest |activation| and a strided sample of its input rows.
- `search_alphas`: per linear, the smoothing strength alpha (0 to 1 in steps of 0.05, or no
  smoothing) with the smallest W8A8 output error on its sample, and its smoothing vector.
- `stored_tensors`: a linear's weight in the file's form (int8 weight, row scales, smoothing).
"""

from __future__ import annotations

import torch

from layers.linear import ParallelLinear
from layers.quant.smoothquant import quantize_smoothed, smoothing, w8a8_error

ALPHAS: tuple[float | None, ...] = (None, *(round(0.05 * i, 2) for i in range(21)))


class ActivationRecorder:
    """Forward pre-hooks on the decoder linears: per-channel |x| maxima and sampled rows."""

    def __init__(self, linears: dict, sample_every: int, sample_tokens: int) -> None:
        self.absmax: dict[str, torch.Tensor] = {}
        self.samples: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        self.seen = dict.fromkeys(linears, 0)
        self.every, self.limit = sample_every, sample_tokens
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name: str):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            amax = x.abs().amax(dim=0)
            prev = self.absmax.get(name)
            self.absmax[name] = amax if prev is None else torch.maximum(prev, amax)
            first = (-self.seen[name]) % self.every
            self.seen[name] += x.shape[0]
            taken = sum(len(t) for t in self.samples[name])
            if taken < self.limit:
                self.samples[name].append(x[first :: self.every][: self.limit - taken].clone())

        return record

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def decoder_linears(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, ParallelLinear)}


def search_alphas(linears: dict, stats: dict, progress: bool) -> dict[str, dict]:
    """Per linear: the alpha with the least W8A8 error, its smoothing vector and the errors."""
    from tqdm import tqdm

    chosen = {}
    for name in tqdm(linears, desc="searching alpha", unit="linear", disable=not progress):
        w = linears[name].weight.data
        absmax, sample = stats[name]
        errors = {a: w8a8_error(sample, w, absmax, a) for a in ALPHAS}
        best = min(errors, key=errors.get)
        chosen[name] = {
            "alpha": best,
            "smooth": smoothing(absmax, w, best),
            "error": errors[best],
            "error_unsmoothed": errors[None],
        }
    return chosen


def stored_tensors(name: str, weight: torch.Tensor, smooth: torch.Tensor) -> dict:
    """A linear's checkpoint weight `name` (`<linear>.weight`) as the file stores it."""
    q, scale = quantize_smoothed(weight, smooth)
    base = name.removesuffix(".weight")
    return {f"{base}.qweight": q, f"{base}.weight_scale": scale, f"{base}.smooth": smooth.clone()}
