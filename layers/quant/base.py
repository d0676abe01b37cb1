"""The interface every quantization mode implements, and the unquantized mode `none`.

A mode owns the parameters of one linear's local (per-rank) matmul:
`create_weights` registers buffers for the local shape, `finalize` runs once after the loader
has filled them, `apply` computes `x @ W.T (+ bias)` for the local shard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuantMode:
    name = "abstract"

    def __init__(self, fast: bool = False, compiled: bool = False, kernels: bool = False) -> None:
        self.fast = fast  # may use a faster kernel that must agree with the plain-torch path
        # Decode steps may run inside torch.compile (shards/compiled_decode.py): keep what the
        # compiled formulation reads, next to what the eager fast path reads.
        self.compiled = compiled
        # may call the hand-written CPU kernels that shards/kernels.py registers, where it has
        self.kernels = kernels

    # Whether the LM head (its logits decide every token) takes this mode too, or stays in the
    # compute dtype, as bitsandbytes-style 4-bit loading leaves it.
    quantize_lm_head = True
    # Whether the mode is chosen to save memory rather than time: a float head it leaves tied
    # to the embedding then reads the embedding's table instead of a packed second copy.
    saves_memory = False
    # The checkpoint tensors that fill a linear, as `<linear>.<param>` (online modes read the
    # float weight), and the file they come from when it is not the model's own weights.
    stored_params: tuple[str, ...] = ("weight",)
    checkpoint_file: str | None = None

    def cpu_lm_head_mode(self) -> QuantMode | None:
        """For a mode that leaves the LM head alone (`quantize_lm_head` False): the mode a CPU
        head takes instead, or None to keep it in the compute dtype."""
        return None

    def create_weights(
        self, layer: nn.Module, out_local: int, in_local: int, dtype: torch.dtype, device
    ) -> None:
        raise NotImplementedError

    def finalize(self, layer: nn.Module) -> None:
        """Called once when every slot of the layer is loaded."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def weight_bytes(self, layer: nn.Module) -> int:
        """Bytes the layer's weight takes in this mode (bias not included)."""
        t = getattr(layer, "packed_weight", None)
        t = layer.weight if t is None else t
        return t.numel() * t.element_size()


def float_weight(layer: nn.Module, out_local: int, in_local: int, dtype, device) -> None:
    """The local weight in the compute dtype, for the loader to fill (online modes quantize it
    in `finalize`)."""
    layer.weight = nn.Parameter(
        torch.empty(out_local, in_local, dtype=dtype, device=device), requires_grad=False
    )


def drop_float_weight(layer: nn.Module) -> None:
    """After quantizing: free the float copy, which is the memory quantization saves."""
    del layer.weight
    layer.weight = None


def row_absmax(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """Each output channel's largest |weight|. A row-parallel layer holds a slice of each row,
    so its maxima are all-reduced: every TP size then picks the same scales."""
    absmax = w.abs().amax(dim=1).float()
    if getattr(layer, "split", None) == "row":
        absmax = layer.pctx.all_reduce_max(absmax)
    return absmax


def padded_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t with zero rows appended up to `rows` (for a kernel's blocks of rows: a padded row has
    scale 0, so it adds nothing)."""
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


# Up to this many rows, a compiled step computes a weight-only linear as one dequantize-
# multiply-sum reduction per row (`fused_gemv`). Inductor fuses the cast into the reduction, so
# int8 weights stream from memory as int8: ~2.5x float32's weight bandwidth at one row. Past 4
# rows its accumulators spill and the int8 GEMM (`int8.int8_two_pass`) wins.
FUSED_GEMV_MAX_ROWS = 4


def fused_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T written as a multiply-and-sum per row of x, for torch.compile: `weight` is
    the expression that dequantizes the stored values, which inductor fuses into the reduction
    instead of materializing a float weight. x: [..., in] with at most FUSED_GEMV_MAX_ROWS
    rows; weight: [out, in]."""
    flat = x.reshape(-1, x.shape[-1])
    # Materialize the input first: left to itself, inductor recomputes the op that produced it
    # (a norm, SiLU) inside the reduction, once per output channel, which is several times slower.
    flat = torch.ops.prims.inductor_force_stride_order.default(flat, (flat.shape[1], 1))
    y = torch.stack([(row * weight).sum(-1) for row in flat.unbind(0)])
    return y.reshape(*x.shape[:-1], weight.shape[0])


_isa = 0  # kept once the kernels answer: compiled steps read it as a constant


def kernel_isa() -> int:
    """The instruction set of the hand-written CPU kernels (layers/quant/gemv.cpp) that
    shards/kernels.py has registered in this process: 0 none, 1 AVX2, 2 AVX-512 VNNI."""
    global _isa
    if not _isa:
        try:
            _isa = int(torch.ops.shardserve_kernels.int8_mm_isa())
        except (AttributeError, RuntimeError):
            return 0
    return _isa


def fused_gemv_fits(x: torch.Tensor) -> bool:
    """Whether this matmul runs inside a compiled step and is small enough for `fused_gemv`."""
    return torch.compiler.is_compiling() and x.numel() <= FUSED_GEMV_MAX_ROWS * x.shape[-1]


# The row count oneDNN lays packed weights out for: measured best across 1-64 rows here.
ONEDNN_BATCH_HINT = 64


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@torch.library.custom_op("shardserve::onednn_linear", mutates_args=())
def _onednn_linear_op(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@_onednn_linear_op.register_fake
def _(x, packed, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias, out_features: int) -> torch.Tensor:
    """x @ W.T (+ bias) with W prepacked by `_reorder_linear_weight`. Inside torch.compile it is
    an opaque op (inductor only lowers oneDNN linears whose weights are frozen constants)."""
    if torch.compiler.is_compiling():
        return _onednn_linear_op(x, packed, bias, out_features)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class NoQuant(QuantMode):
    """Plain weights in the compute dtype: the reference every other mode is measured against.

    With `fast=True`, a float32 CPU layer repacks its weight once for oneDNN's linear, which
    streams weights about twice as fast as the default GEMM at decode batch sizes (1-64 rows);
    the plain weight's storage is then released.
    """

    name = "none"

    def create_weights(self, layer, out_local, in_local, dtype, device) -> None:
        float_weight(layer, out_local, in_local, dtype, device)
        layer.packed_weight = None

    def finalize(self, layer) -> None:
        w = layer.weight
        if self.fast and w.device.type == "cpu" and w.dtype == torch.float32 and onednn_available():
            layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(w.data, ONEDNN_BATCH_HINT)
            layer.weight.data = torch.empty(0, w.shape[1], dtype=w.dtype)

    def apply(self, layer, x, bias):
        if layer.packed_weight is not None:
            return onednn_linear(x, layer.packed_weight, bias, layer.out_local)
        return F.linear(x, layer.weight, bias)
