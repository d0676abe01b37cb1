"""`smoothquant`: W8A8 int8 with per-input-channel smoothing, read from a calibrated file.

SmoothQuant moves activation outliers into the weights: for a smoothing vector `s` over the
input channels, `x @ W.T == (x / s) @ (W * s).T`. Calibration (`shardserve quantize`) picks `s`
per layer so that both `x / s` and `W * s` quantize well to int8, and writes the finished
checkpoint; nothing is quantized at load time.

The file, `smoothq_model-8bit-auto.safetensors` in the model folder, is a complete checkpoint
under the original tensor names. For every linear weight `<name>.weight` of the decoder layers
it holds instead:

    <name>.qweight       int8    [out, in]   round((W * s) / weight_scale[:, None]), |q| <= 127
    <name>.weight_scale  float32 [out]       max_j |W * s|[row, j] / 127 (whole rows)
    <name>.smooth        float32 [in]        s; equal for linears that share an input (q, k, v)

Every other tensor (embeddings, norms, biases, the LM head) is copied unchanged. The metadata
holds `format` = `shardserve-smoothquant`, `version`, the model's `architecture`,
`hidden_size`, `num_hidden_layers`, `vocab_size`, the calibration token count and the chosen
smoothing strength per layer (`alpha`, JSON).

The plain-torch path is the oracle and is W8A8 as int8 GPU kernels compute it: each token of
`x / s` is rounded to int8 with its own scale (absmax / 127), multiplied with the int8 weights in
exact integer arithmetic, then rescaled. The CPU fast paths read the same int8 weights at a
finer activation precision: `int8.int8_two_pass` (~15-bit activations through one int8 GEMM or
the int8 GEMV kernel) and, where that kernel is not built, in compiled decode steps of up to 4
rows, `fused_gemv` (float activations). The tests bound their distance from the oracle.
"""

from __future__ import annotations

import torch
from torch import nn

from layers.quant.base import QuantMode, fused_gemv, fused_gemv_fits
from layers.quant.int8 import (
    QMAX,
    int8_matmul_available,
    int8_two_pass,
    quantize_rows,
    token_absmax,
    uses_int8_kernel,
)

SMOOTHQUANT_FILE = "smoothq_model-8bit-auto.safetensors"
FORMAT = "shardserve-smoothquant"
FORMAT_VERSION = "1"


def quantize_tokens(
    x: torch.Tensor, absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: integer-valued codes (in x's dtype) and one scale per row,
    from each row's |max| (or the given one)."""
    scale = (token_absmax(x) if absmax is None else absmax) / QMAX
    return torch.round(x / scale).clamp_(-QMAX, QMAX), scale


def w8a8_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    token_absmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ (qweight * weight_scale).T with x rounded per token to int8. The integer products are
    summed in float64, where they are exact, as an int32 accumulator would hold them."""
    flat = x.reshape(-1, x.shape[-1]).double()
    absmax = None if token_absmax is None else token_absmax.double()
    codes, token_scale = quantize_tokens(flat, absmax)
    acc = codes @ qweight.double().T
    y = acc * token_scale * weight_scale.double()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def smoothing(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) per input channel j, or all
    ones for `alpha=None` (no smoothing). Dead channels keep s = 1."""
    if alpha is None:
        return torch.ones_like(act_absmax, dtype=torch.float32)
    a = act_absmax.float().clamp(min=1e-5)
    w = weight.abs().amax(dim=0).float().clamp(min=1e-5)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    return torch.where(act_absmax > 0, s, torch.ones_like(s)).clamp(min=1e-5)


def quantize_smoothed(weight: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, per-row scales) of `weight * s`, the stored form of one linear."""
    ws = weight.float() * s[None, :]
    return quantize_rows(ws, ws.abs().amax(dim=1))


def w8a8_error(
    x: torch.Tensor, weight: torch.Tensor, act_absmax: torch.Tensor, alpha: float | None
) -> float:
    """Mean squared output error of W8A8 with smoothing strength `alpha` on sample inputs `x`,
    relative to the float layer's output energy: the objective of the per-layer search."""
    s = smoothing(act_absmax, weight, alpha)
    q, scale = quantize_smoothed(weight, s)
    codes, token_scale = quantize_tokens(x.float() / s)
    # float32 sums of integer products: exact enough to rank candidates, 4x cheaper than float64
    y = (codes @ q.float().T) * token_scale * scale
    ref = x.float() @ weight.float().T
    return ((y - ref).pow(2).mean() / ref.pow(2).mean().clamp(min=1e-30)).item()


class SmoothQuantW8A8(QuantMode):
    name = "smoothquant"
    quantize_lm_head = False  # the file keeps the head in the checkpoint's dtype
    stored_params = ("qweight", "weight_scale", "smooth")
    checkpoint_file = SMOOTHQUANT_FILE

    def create_weights(self, layer, out_local, in_local, dtype, device) -> None:
        def param(*shape, dt):
            return nn.Parameter(torch.empty(*shape, dtype=dt, device=device), requires_grad=False)

        layer.qweight = param(out_local, in_local, dt=torch.int8)
        layer.weight_scale = param(out_local, dt=torch.float32)
        layer.smooth = param(in_local, dt=torch.float32)
        layer.weight = None
        layer.compute_dtype = dtype

    def finalize(self, layer) -> None:
        layer.inv_smooth = (1.0 / layer.smooth.data).to(layer.qweight.device)
        layer.int8_gemm = (
            self.fast
            and layer.qweight.device.type == "cpu"
            and layer.compute_dtype == torch.float32
            and int8_matmul_available()
        )
        # the kernel's AVX2 path negates weights: a file made elsewhere may hold -128
        layer.int8_kernel = uses_int8_kernel(self, layer) and int(layer.qweight.min()) > -QMAX - 1

    def dequantized(self, layer) -> torch.Tensor:
        """The float weight of the original (unsmoothed) layer that the file stands for."""
        q = layer.qweight.data
        return q.float() * layer.weight_scale.float()[:, None] / layer.smooth.float()[None, :]

    def weight_bytes(self, layer) -> int:
        out_local = layer.weight_scale.numel()
        return out_local * layer.in_local + (out_local + layer.in_local) * 4

    def apply(self, layer, x, bias):
        xs = x * layer.inv_smooth.to(x.dtype)
        if fused_gemv_fits(xs) and not layer.int8_kernel:
            y = fused_gemv(xs, layer.qweight.to(xs.dtype)) * layer.weight_scale
        elif layer.int8_gemm:
            qweight, scale = layer.qweight, layer.weight_scale
            y = int8_two_pass(xs, qweight, scale, self.compiled, layer.int8_kernel)
        else:
            # A row-parallel rank holds a slice of each token: the token's scale is the maximum
            # over all ranks, so every TP size rounds every activation alike.
            absmax = None
            if getattr(layer, "split", None) == "row" and layer.pctx.world_size > 1:
                absmax = layer.pctx.all_reduce_max(token_absmax(xs.reshape(-1, xs.shape[-1])))
            y = w8a8_matmul(xs, layer.qweight, layer.weight_scale, absmax)
        return y + bias if bias is not None else y
