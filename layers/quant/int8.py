"""`ifq`: int8 weight-only, symmetric, one scale per output channel.

Online: the loader fills a float weight for the local shard; `finalize` quantizes it and frees
the float copy. A row-parallel layer's scales are maxima over the *whole* row (all ranks), so
every TP size stores the same int8 values and scales.

The oracle is plain torch: `(x @ q.T) * scale`. On CPUs with FBGEMM the fast path hands the
int8 weights to FBGEMM's dynamic linear: it streams a quarter of float32's bytes and its GEMV is
~2.7x faster than the float32 one here. FBGEMM also rounds its input to 7-bit integers
(`reduce_range`, so AVX2's 16-bit pair sums cannot saturate); `fbgemm_two_pass` sends that
rounding error through as well, for ~14-bit activations (bound in the tests).

On CUDA, fast or not, the int8 weight is cast to the compute dtype for cuBLAS: torch's CUDA
`_weight_int8pack_mm` measured 2-10x slower than that on an H100 at every decode shape
(BENCHMARKS.md, GPU).
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F

from layers.quant.base import (
    QuantMode,
    drop_float_weight,
    float_weight,
    fused_gemv,
    fused_gemv_fits,
    row_absmax,
)

QMAX = 127


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines or (
        "x86" in torch.backends.quantized.supported_engines
    )


def quantize_rows(w: torch.Tensor, row_absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and float32 scales for `w` [out, in] given each row's absolute maximum."""
    scale = (row_absmax.float() / QMAX).clamp(min=1e-12)
    q = torch.round(w.float() / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


# FBGEMM's packed weights are opaque objects that torch.compile cannot take as graph inputs. A
# compiled step reaches them through `shardserve::fbgemm_linear`, keyed by the int8 tensor they
# were packed from, which the graph does take as an input (compiled modes keep it).
_PACKED: dict[int, object] = {}


def register_packed(q: torch.Tensor, packed) -> None:
    key = q.data_ptr()
    _PACKED[key] = packed
    weakref.finalize(q, _PACKED.pop, key, None)


@torch.library.custom_op("shardserve::fbgemm_linear", mutates_args=())
def _fbgemm_linear_op(x: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x, _PACKED[qweight.data_ptr()], True)


@_fbgemm_linear_op.register_fake
def _(x, qweight):
    return x.new_empty(x.shape[0], qweight.shape[0])


def prepack_fbgemm(q: torch.Tensor, scale: torch.Tensor):
    """int8 rows with one scale each, packed for FBGEMM's dynamic int8 linear."""
    with warnings.catch_warnings():  # quantized tensors are deprecated; FBGEMM's
        warnings.simplefilter("ignore")  # prepack still takes only them
        qw = torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0
        )
    return torch.ops.quantized.linear_prepack(qw, None)


class Int8WeightOnly(QuantMode):
    name = "ifq"

    def create_weights(self, layer, out_local, in_local, dtype, device) -> None:
        float_weight(layer, out_local, in_local, dtype, device)

    def finalize(self, layer) -> None:
        w = layer.weight.data
        q, scale = quantize_rows(w, row_absmax(layer, w))
        layer.qweight = layer.fbgemm_packed = None
        layer.weight_scale = scale.to(w.dtype if w.device.type != "cpu" else torch.float32)
        if self.fast and w.device.type == "cpu" and w.dtype == torch.float32 and fbgemm_available():
            layer.fbgemm_packed = prepack_fbgemm(q, scale)
            layer.fbgemm_span = span_row(w.shape[1])
        if layer.fbgemm_packed is None or self.compiled:  # compiled steps read the plain int8
            layer.qweight = q
            if layer.fbgemm_packed is not None:
                register_packed(q, layer.fbgemm_packed)
        drop_float_weight(layer)

    def dequantized(self, layer) -> torch.Tensor:
        """The float weight the int8 values stand for (the test oracle)."""
        q = layer.qweight
        if q is None:
            q = torch.ops.quantized.linear_unpack(layer.fbgemm_packed)[0].int_repr()
        return q.float() * layer.weight_scale.float()[:, None]

    def weight_bytes(self, layer) -> int:
        out_features = layer.weight_scale.numel()
        copies = (layer.qweight is not None) + (layer.fbgemm_packed is not None)
        return copies * out_features * layer.in_local + out_features * 4

    def apply(self, layer, x, bias):
        if layer.qweight is not None and fused_gemv_fits(x):
            y = fused_gemv(x, layer.qweight.to(x.dtype)) * layer.weight_scale
        elif layer.fbgemm_packed is not None:
            y = fbgemm_two_pass(x, layer.fbgemm_packed, layer.fbgemm_span, layer.qweight)
        else:
            y = F.linear(x, layer.qweight.to(x.dtype)) * layer.weight_scale.to(x.dtype)
        return y + bias if bias is not None else y


def _row_absmax(x: torch.Tensor) -> torch.Tensor:
    # abs + amax: ~6x faster here than vector_norm(inf) at decode sizes
    return x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-30)


# FBGEMM derives its activation grid from the input's min and max. Every row we hand it lies in
# [-1, 1] and one extra row holds -1 and _SPAN_TOP, so the grid is always this one. (A top of
# exactly 1 puts the zero point on a .5 tie that FBGEMM rounds differently from torch.)
_SPAN_TOP = 1.1
_UNIT_SCALE, _UNIT_ZERO_POINT = torch._choose_qparams_per_tensor(
    torch.tensor([-1.0, _SPAN_TOP]), True
)
_UNIT_INV_SCALE = 1.0 / _UNIT_SCALE


def span_row(in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    span = torch.zeros(1, in_features, dtype=dtype)
    span[0, 0], span[0, -1] = -1.0, _SPAN_TOP
    return span


def fbgemm_two_pass(
    x: torch.Tensor, packed, span: torch.Tensor, qweight: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ W.T with FBGEMM's int8 GEMM at ~14-bit activation precision.

    FBGEMM rounds its whole input to one 7-bit grid. Each row is first scaled to [-1, 1] (one
    scale per token); the rounding error FBGEMM will make on that fixed grid is computed
    exactly and fed through the same call as extra rows, so the weights stream once. Inside a
    compiled step (`qweight`: the int8 tensor `packed` was registered under) the call goes
    through `shardserve::fbgemm_linear` and inductor fuses the arithmetic around it."""
    flat = x.reshape(-1, x.shape[-1])
    m = flat.shape[0]
    r = _row_absmax(flat)
    xn = flat / r
    if torch.compiler.is_compiling():
        # One materialized xn for both uses: inductor would otherwise recompute it for each,
        # possibly a bit differently, and the error pass must see FBGEMM's exact input.
        xn = torch.ops.prims.inductor_force_stride_order.default(xn, (xn.shape[1], 1))
    # FBGEMM's rounding of xn: its zero point is a whole number, so it drops out; torch.round
    # rounds half to even as FBGEMM does, and is ~5x faster than fake_quantize here.
    lo = xn - torch.round(xn * _UNIT_INV_SCALE).mul_(_UNIT_SCALE)
    r_lo = _row_absmax(lo)
    rows = torch.cat([xn, lo.div_(r_lo), span])
    if torch.compiler.is_compiling():
        y = _fbgemm_linear_op(rows, qweight)
    else:
        y = torch.ops.quantized.linear_dynamic(rows, packed, True)
    y = torch.addcmul(y[:m], y[m : 2 * m], r_lo).mul_(r)
    return y.reshape(*x.shape[:-1], y.shape[-1])
