"""Sharded layers without processes: every rank's shard is built in one process, filled from one
full random checkpoint tensor exactly as `shards/loader.py` does (`checkpoint_shape`, then
`slice_for`), and the concatenated or summed `forward_local` outputs are compared with the
unsharded float32 math."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from layers.parallel import ParallelContext, ShardingError, divide

WORLD_SIZES = [2, 4]
TOL = dict(atol=1e-5, rtol=0)  # float32; sums of at most 32 products of unit-scale values
NUM_TOKENS = 5


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ranks(ws: int, make) -> list:
    """One layer per rank, parameters poisoned with NaN so an unfilled entry shows."""
    layers = []
    for rank in range(ws):
        layer = make(ParallelContext(rank=rank, world_size=ws))
        for p in layer.parameters():
            p.data.fill_(float("nan"))
        layers.append(layer)
    return layers


def _load(layer, pname: str, slot: str, full: torch.Tensor) -> None:
    """What the loader does for one checkpoint tensor: check its global shape, then copy this
    rank's slice to where the layer says it lands."""
    assert layer.checkpoint_shape(pname, slot) == tuple(full.shape)
    spec = layer.slice_for(pname, slot)
    param = getattr(layer, pname).data
    if spec.dim is None:
        src, dst = full, param
    else:
        src = full.narrow(spec.dim, spec.src_start, spec.length)
        dst = param.narrow(spec.dim, spec.dst_start, spec.length)
    assert src.shape == dst.shape, (pname, slot, src.shape, dst.shape)
    dst.copy_(src)


def _assert_filled(layers) -> None:
    for rank, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            assert not p.isnan().any(), f"rank {rank}: {name} has entries no slice filled"


# --- divide ---------------------------------------------------------------------------------


def test_divide_returns_the_quotient():
    assert divide(32, 4, "attention heads") == 8


def test_divide_raises_a_readable_error():
    with pytest.raises(ShardingError, match="tensor parallel size 3 does not divide 8 widgets"):
        divide(8, 3, "widgets")


def test_divide_by_zero_is_a_sharding_error():
    with pytest.raises(ShardingError, match="tensor parallel size 0"):
        divide(8, 0, "widgets")


# --- ColumnParallelLinear -------------------------------------------------------------------


@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_column_parallel_concatenated_outputs_equal_full_linear(ws):
    w, b, x = _randn(32, 24, seed=0), _randn(32, seed=1), _randn(NUM_TOKENS, 24, seed=2)
    layers = _ranks(ws, lambda pctx: ColumnParallelLinear(24, 32, bias=True, pctx=pctx))
    for layer in layers:
        _load(layer, "weight", "", w)
        _load(layer, "bias", "", b)
    _assert_filled(layers)
    out = torch.cat([layer.forward_local(x) for layer in layers], dim=-1)
    torch.testing.assert_close(out, F.linear(x, w, b), **TOL)


@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_column_parallel_checkpoint_shape_is_global(ws):
    layer = ColumnParallelLinear(24, 32, bias=True, pctx=ParallelContext(ws - 1, ws))
    assert layer.weight.shape == (32 // ws, 24)
    assert layer.checkpoint_shape("weight", "") == (32, 24)
    assert layer.checkpoint_shape("bias", "") == (32,)


def test_column_parallel_rejects_indivisible_output():
    with pytest.raises(ShardingError, match="size 4 does not divide 30 output features"):
        ColumnParallelLinear(24, 30, pctx=ParallelContext(0, 4))


# --- MergedColumnParallelLinear (gate/up) ----------------------------------------------------

# Different gate and up sizes so a slice landing in the other slot's range shows.
GATE, UP, HIDDEN = 32, 48, 24


def _merged(ws: int):
    w_gate, w_up = _randn(GATE, HIDDEN, seed=10), _randn(UP, HIDDEN, seed=11)
    b_gate, b_up = _randn(GATE, seed=12), _randn(UP, seed=13)
    layers = _ranks(
        ws,
        lambda pctx: MergedColumnParallelLinear(
            HIDDEN, {"gate": GATE, "up": UP}, bias=True, pctx=pctx
        ),
    )
    for layer in layers:
        _load(layer, "weight", "gate", w_gate)
        _load(layer, "weight", "up", w_up)
        _load(layer, "bias", "gate", b_gate)
        _load(layer, "bias", "up", b_up)
    _assert_filled(layers)
    x = _randn(NUM_TOKENS, HIDDEN, seed=14)
    return layers, x, F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up)


@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_merged_column_rank_output_is_gate_slice_then_up_slice(ws):
    layers, x, gate, up = _merged(ws)
    g, u = GATE // ws, UP // ws
    for rank, layer in enumerate(layers):
        out = layer.forward_local(x)
        assert out.shape == (NUM_TOKENS, g + u)
        torch.testing.assert_close(out[:, :g], gate[:, rank * g : (rank + 1) * g], **TOL)
        torch.testing.assert_close(out[:, g:], up[:, rank * u : (rank + 1) * u], **TOL)


@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_merged_column_concatenated_slots_equal_full_gate_and_up(ws):
    layers, x, gate, up = _merged(ws)
    g = GATE // ws
    outs = [layer.forward_local(x) for layer in layers]
    torch.testing.assert_close(torch.cat([o[:, :g] for o in outs], dim=-1), gate, **TOL)
    torch.testing.assert_close(torch.cat([o[:, g:] for o in outs], dim=-1), up, **TOL)


@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_merged_column_checkpoint_shape_is_global_per_slot(ws):
    layer = MergedColumnParallelLinear(
        HIDDEN, {"gate": GATE, "up": UP}, bias=True, pctx=ParallelContext(ws - 1, ws)
    )
    assert layer.checkpoint_shape("weight", "gate") == (GATE, HIDDEN)
    assert layer.checkpoint_shape("weight", "up") == (UP, HIDDEN)
    assert layer.checkpoint_shape("bias", "gate") == (GATE,)
    assert layer.checkpoint_shape("bias", "up") == (UP,)


def test_merged_column_rejects_unknown_slot():
    layer = MergedColumnParallelLinear(HIDDEN, {"gate": GATE, "up": UP})
    with pytest.raises(KeyError, match="down"):
        layer.slice_for("weight", "down")


def test_merged_column_rejects_indivisible_slot():
    with pytest.raises(ShardingError, match="does not divide 30 output features of up"):
        MergedColumnParallelLinear(HIDDEN, {"gate": 32, "up": 30}, pctx=ParallelContext(0, 4))


# --- QKVParallelLinear -----------------------------------------------------------------------

HEAD_DIM, QKV_HIDDEN = 4, 32


def _qkv(ws: int, num_heads: int, num_kv_heads: int):
    d = HEAD_DIM
    w = {
        s: _randn(n * d, QKV_HIDDEN, seed=20 + i)
        for i, (s, n) in enumerate((("q", num_heads), ("k", num_kv_heads), ("v", num_kv_heads)))
    }
    b = {s: _randn(t.shape[0], seed=30 + i) for i, (s, t) in enumerate(w.items())}
    layers = _ranks(
        ws,
        lambda pctx: QKVParallelLinear(
            QKV_HIDDEN, d, num_heads, num_kv_heads, bias=True, pctx=pctx
        ),
    )
    for layer in layers:
        for slot in "qkv":
            _load(layer, "weight", slot, w[slot])
            _load(layer, "bias", slot, b[slot])
    _assert_filled(layers)
    x = _randn(NUM_TOKENS, QKV_HIDDEN, seed=40)
    # [num_tokens, heads, head_dim] per projection, from the unsharded weights
    full = {s: F.linear(x, w[s], b[s]).view(NUM_TOKENS, -1, d) for s in "qkv"}
    return layers, x, full


def _kv_heads_for(rank: int, ws: int, num_heads: int, num_kv_heads: int) -> list[int]:
    """The KV heads the rank's query heads attend with (query head h uses KV head h // group)."""
    local = num_heads // ws
    group = num_heads // num_kv_heads
    return sorted({h // group for h in range(rank * local, (rank + 1) * local)})


QKV_CASES = [  # (world size, num_heads, num_key_value_heads)
    (2, 8, 2),  # GQA, KV heads split
    (4, 8, 2),  # GQA, each KV head replicated on two ranks
    (4, 8, 8),  # MHA
    (2, 8, 1),  # MQA, replicated everywhere
    (4, 8, 1),
    (2, 8, 4),
    (4, 8, 4),
]


@pytest.mark.parametrize(("ws", "num_heads", "num_kv_heads"), QKV_CASES)
def test_qkv_rank_outputs_are_head_slices_of_full_qkv(ws, num_heads, num_kv_heads):
    layers, x, full = _qkv(ws, num_heads, num_kv_heads)
    for rank, layer in enumerate(layers):
        q_size, kv_size, _ = layer.local_sizes()
        q, k, v = layer.forward_local(x).split([q_size, kv_size, kv_size], dim=-1)
        local = num_heads // ws
        q_heads = list(range(rank * local, (rank + 1) * local))
        kv_heads = _kv_heads_for(rank, ws, num_heads, num_kv_heads)
        assert (layer.local_num_heads, layer.local_num_kv_heads) == (local, len(kv_heads))
        want = {"q": q_heads, "k": kv_heads, "v": kv_heads}
        for slot, got in zip("qkv", (q, k, v), strict=True):
            expected = full[slot][:, want[slot]].reshape(NUM_TOKENS, -1)
            torch.testing.assert_close(got, expected, **TOL, msg=f"rank {rank} slot {slot}")


@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_qkv_concatenated_query_heads_equal_full_q(ws):
    layers, x, full = _qkv(ws, 8, 2)
    qs = [layer.forward_local(x)[:, : layer.local_sizes()[0]] for layer in layers]
    torch.testing.assert_close(torch.cat(qs, dim=-1), full["q"].reshape(NUM_TOKENS, -1), **TOL)


def test_qkv_replicates_each_kv_head_on_consecutive_ranks():
    layers, x, full = _qkv(4, 8, 2)
    assert [layer.kv_head_start for layer in layers] == [0, 0, 1, 1]
    assert all(layer.local_num_kv_heads == 1 for layer in layers)
    for rank, layer in enumerate(layers):
        q_size, kv_size, _ = layer.local_sizes()
        k = layer.forward_local(x)[:, q_size : q_size + kv_size]
        torch.testing.assert_close(k, full["k"][:, rank // 2], **TOL)


@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_qkv_checkpoint_shape_is_global(ws):
    layer = QKVParallelLinear(QKV_HIDDEN, HEAD_DIM, 8, 2, bias=True, pctx=ParallelContext(0, ws))
    assert layer.checkpoint_shape("weight", "q") == (8 * HEAD_DIM, QKV_HIDDEN)
    assert layer.checkpoint_shape("weight", "k") == (2 * HEAD_DIM, QKV_HIDDEN)
    assert layer.checkpoint_shape("weight", "v") == (2 * HEAD_DIM, QKV_HIDDEN)
    assert layer.checkpoint_shape("bias", "q") == (8 * HEAD_DIM,)
    assert layer.checkpoint_shape("bias", "k") == (2 * HEAD_DIM,)


def test_qkv_world_size_not_dividing_heads_raises():
    with pytest.raises(ShardingError, match="tensor parallel size 3 does not divide 8 attention"):
        QKVParallelLinear(QKV_HIDDEN, HEAD_DIM, 8, 2, pctx=ParallelContext(0, 3))


def test_qkv_kv_heads_not_dividing_world_size_raises():
    with pytest.raises(ShardingError, match="3 KV heads do not divide tensor parallel size 4"):
        QKVParallelLinear(QKV_HIDDEN, HEAD_DIM, 12, 3, pctx=ParallelContext(0, 4))


def test_qkv_world_size_not_dividing_kv_heads_raises():
    with pytest.raises(ShardingError, match="tensor parallel size 2 does not divide 3 KV heads"):
        QKVParallelLinear(QKV_HIDDEN, HEAD_DIM, 6, 3, pctx=ParallelContext(0, 2))


def test_qkv_rejects_unknown_slot():
    with pytest.raises(KeyError, match="'o'"):
        QKVParallelLinear(QKV_HIDDEN, HEAD_DIM, 8, 2).slice_for("weight", "o")


# --- RowParallelLinear -----------------------------------------------------------------------


def _row(ws: int):
    w, b, x = _randn(24, 32, seed=50), _randn(24, seed=51), _randn(NUM_TOKENS, 32, seed=52)
    layers = _ranks(ws, lambda pctx: RowParallelLinear(32, 24, bias=True, pctx=pctx))
    for layer in layers:
        _load(layer, "weight", "", w)
        _load(layer, "bias", "", b)
    _assert_filled(layers)
    n = 32 // ws
    # Each rank sees its slice of the input features (the column-parallel output before it).
    xs = [x[:, r * n : (r + 1) * n] for r in range(ws)]
    return layers, xs, w, b, F.linear(x, w, b)


@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_row_parallel_summed_outputs_equal_full_linear(ws):
    layers, xs, _, _, ref = _row(ws)
    out = sum(layer.forward_local(x) for layer, x in zip(layers, xs, strict=True))
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_row_parallel_adds_bias_on_rank_zero_only(ws):
    layers, xs, w, b, _ = _row(ws)
    n = 32 // ws
    for rank, (layer, x) in enumerate(zip(layers, xs, strict=True)):
        partial = F.linear(x, w[:, rank * n : (rank + 1) * n])
        want = partial + b if rank == 0 else partial
        torch.testing.assert_close(layer.forward_local(x), want, **TOL, msg=f"rank {rank}")


@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_row_parallel_checkpoint_shape_is_global(ws):
    layer = RowParallelLinear(32, 24, bias=True, pctx=ParallelContext(ws - 1, ws))
    assert layer.weight.shape == (24, 32 // ws)
    assert layer.checkpoint_shape("weight", "") == (24, 32)
    assert layer.checkpoint_shape("bias", "") == (24,)


def test_row_parallel_slots_report_global_output_size():
    layer = RowParallelLinear(32, 24, pctx=ParallelContext(0, 2))
    assert layer.slots() == {"": 24}


def test_row_parallel_rejects_indivisible_input():
    with pytest.raises(ShardingError, match="size 4 does not divide 30 input features"):
        RowParallelLinear(30, 24, pctx=ParallelContext(0, 4))


def test_sharding_error_is_a_value_error_with_the_numbers():
    with pytest.raises(ValueError, match=re.escape("size 4 does not divide 6 attention heads")):
        QKVParallelLinear(QKV_HIDDEN, HEAD_DIM, 6, 2, pctx=ParallelContext(0, 4))
