"""Compiled graphs called without dynamo (shards/compile_cache.py: DirectCalls)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shards.compile_cache import DirectCalls
from tests.support.tiny import build_hf_model, make_worker, save_checkpoint, tiny_config


class Toy(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.extra = torch.randn(width)  # a plain tensor attribute, as the quantized layers hold


def _write_then_read(toy, x, cache, slots, table):
    cache.index_copy_(0, slots, x)  # as a decode step writes its K/V
    return toy.lin(x) + toy.extra + table.sum(), cache[slots].sum(0)


def _broken(toy, x, cache, slots, table):
    y = toy.lin(x)
    torch._dynamo.graph_break()
    return y + table.sum(), cache.sum(0)


def _key(toy, x, cache, slots, table):
    return x.shape[0]


def _call(calls, toy, width: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x, table = torch.randn(2, 8, generator=g), torch.randn(2, width, generator=g)
    torch._dynamo.mark_dynamic(table, 1)
    cache = torch.zeros(10, 8)
    out = calls(toy, x, cache, torch.tensor([3, 5]), table)
    expected = _write_then_read(toy, x, torch.zeros(10, 8), torch.tensor([3, 5]), table)
    return out, expected, cache


def _no_dynamo(*args):
    raise AssertionError("called through dynamo")


@torch.inference_mode()
def test_a_traced_graph_is_called_directly_with_each_module_and_width():
    calls = DirectCalls(_write_then_read, Toy(8), key=_key)
    toys = [Toy(8), Toy(8)]  # modules described alike share the graph, each with its tensors
    _call(calls, toys[0], width=3, seed=0)  # traces
    assert calls.graphs[2] is not None
    calls.compiled = _no_dynamo
    for toy, width in ((toys[0], 3), (toys[1], 5), (toys[0], 7)):  # the width is dynamic
        out, expected, cache = _call(calls, toy, width, seed=width)
        for got, want in zip(out, expected):
            torch.testing.assert_close(got, want)
        assert cache[3].abs().sum() > 0 and cache[0].abs().sum() == 0  # the write landed


@torch.inference_mode()
def test_a_second_caller_reuses_the_graph_another_traced():
    first = DirectCalls(_write_then_read, Toy(8), key=_key)
    _call(first, Toy(8), width=3, seed=1)
    second = DirectCalls(_write_then_read, Toy(8), key=_key)  # same compiled function
    assert second.compiled is first.compiled
    _call(second, Toy(8), width=4, seed=2)  # dynamo runs the graph `first` traced
    assert second.graphs[2] is not None


@torch.inference_mode()
def test_a_call_that_breaks_into_graphs_stays_with_dynamo():
    calls = DirectCalls(_broken, Toy(8), key=_key)
    toy, x, cache = Toy(8), torch.randn(2, 8), torch.randn(10, 8)
    table = torch.randn(2, 3)
    y, total = calls(toy, x, cache, torch.tensor([1, 2]), table)
    assert calls.graphs[2] is None
    y, total = calls(toy, x, cache, torch.tensor([1, 2]), table)  # still correct, via dynamo
    torch.testing.assert_close(y, toy.lin(x) + table.sum())
    torch.testing.assert_close(total, cache.sum(0))


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return save_checkpoint(build_hf_model(tiny_config("llama")), tmp_path_factory.mktemp("llama"))


def test_every_compiled_decode_step_is_called_directly(llama_folder):
    worker = make_worker(llama_folder, cpu_compile=True, lookahead=True)
    compiled = worker.runner.compiled
    assert compiled.failed is None and compiled.tree_rows
    layer_steps = set(compiled.compiled_layers.values())
    keys = {k for step in layer_steps for k in step.graphs}
    rows = {b for b, _ in compiled.ready}
    # each compiled shape: its first layer (no residual yet) and the others, with or without
    # a tree mask
    assert keys == {(b, first, not tree) for b, tree in compiled.ready for first in (True, False)}
    assert all(g is not None for step in layer_steps for g in step.graphs.values())
    assert set(compiled.compiled_head.graphs) == rows
    assert all(g is not None for g in compiled.compiled_head.graphs.values())


class Box:  # an argument of a kind the signature does not describe
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def _boxed(toy, box):
    return toy.lin(box.t)


def _one(toy, box):
    return 1


@torch.inference_mode()
def test_a_call_with_an_opaque_argument_never_borrows_a_graph():
    first = DirectCalls(_boxed, Toy(8), key=_one)
    toy, box = Toy(8), Box(torch.randn(2, 8))
    torch.testing.assert_close(first(toy, box), toy.lin(box.t))  # traced: its own graph
    assert first.graphs[1] is not None
    second = DirectCalls(_boxed, Toy(8), key=_one)
    torch.testing.assert_close(second(toy, box), toy.lin(box.t))
    assert second.graphs[1] is None  # not knowing which graph dynamo ran, it keeps dynamo's
