"""torch.compile'd functions without per-call module guards, shared by look-alike modules.

By default a compiled function re-checks, on every call, every attribute of every module it
read: ~45 us per decoder layer here, a sixth of a single-stream decode step. `compiled_for`
drops the modules' guards (tensors passed as arguments keep theirs) and instead gives module
trees whose descriptions differ (`_describe`: types, plain attributes, tensor shapes, strides
and dtypes) a function of their own, with its own code object and so its own compile cache.
A graph is thus only ever reused for modules described exactly like the ones it was traced
from, in this model or any other the process loads.

Even unguarded, entering a compiled function costs ~50 us (dynamo's cache lookup, the bytecode
that gathers the graph's inputs, its frame wrappers): 1.5 ms of a 30-layer single-stream step.
`DirectCalls` records each graph as it is traced, with where each of its inputs came from, and
from then on calls it itself: the modules' tensors gathered once per module, the call's own
arguments per call.
"""

from __future__ import annotations

import logging
import re
import types

import torch
from torch import nn

log = logging.getLogger("shardserve.compile_cache")

# Dynamo's guards (or, called directly, DirectCalls' keys) already settle every tensor
# argument's sizes and strides before a graph runs; the generated code's own size asserts
# repeat that, ~15 us per decoder layer here.
_OPTIONS = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
_INDUCTOR = {"size_asserts": False}
_COMPILED: dict[tuple, object] = {}  # (function name, description) -> compiled function
# graphs traced during the current DirectCalls call: (compiled graph, its inputs' sources)
_TRACED: list[tuple[object, list[str]]] = []
# (compiled function, the call's signature) -> the one graph traced for such calls
_GRAPHS: dict[tuple, tuple[object, list[str]]] = {}


def _describe(obj, depth: int = 0):
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.stride(), str(obj.dtype), obj.device.type)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (tuple, list)):
        return tuple(_describe(o, depth) for o in obj)
    if isinstance(obj, dict):
        return tuple((k, _describe(v, depth)) for k, v in sorted(obj.items(), key=lambda kv: kv[0]))
    if isinstance(obj, nn.Module) or depth >= 2 or not hasattr(obj, "__dict__"):
        return type(obj).__qualname__  # modules are described one by one, below
    return (type(obj).__qualname__, _describe(vars(obj), depth + 1))


def describe(*roots: nn.Module) -> tuple:
    """Everything about the module trees under `roots` that tracing them could depend on,
    other than tensor values."""
    return tuple(
        (
            name,
            type(m).__qualname__,
            _describe({k: v for k, v in vars(m).items() if k != "_modules"}),
        )
        for root in roots
        for name, m in root.named_modules()
    )


def compiled_for(fn, *roots: nn.Module):
    """`fn` compiled with static shapes, shared by every call on module trees described like
    `roots` (which `fn` receives among its arguments)."""
    key = (fn.__qualname__, describe(*roots))
    if key not in _COMPILED:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_COMPILED)}")
        copy = types.FunctionType(code, fn.__globals__, code.co_name)
        _COMPILED[key] = torch.compile(copy, dynamic=False, backend=_inductor, options=_OPTIONS)
    return _COMPILED[key]


def _inductor(gm: torch.fx.GraphModule, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    compiled = compile_fx(gm, example_inputs, config_patches=_INDUCTOR)
    # where each input comes from, as dynamo names it (L['h'], L['layer']._modules['mlp']...):
    # dynamo drops these names once the graph is compiled
    sources = [n.meta["grapharg"].source.name for n in gm.graph.find_nodes(op="placeholder")]
    _TRACED.append((compiled, sources))
    return compiled


_ROOT = re.compile(r"L\['(\w+)'\]")


class _Graph:
    """One traced graph and how to gather its inputs from a call's arguments."""

    def __init__(self, compiled, sources: list[str], fn, args, single: bool) -> None:
        self.compiled, self.single, self.globals = compiled, single, fn.__globals__
        self.names = list(fn.__code__.co_varnames[: fn.__code__.co_argcount])
        self.module_args = [i for i, a in enumerate(args) if isinstance(a, nn.Module)]
        modules = {self.names[i] for i in self.module_args}
        self.getters = [eval(f"lambda L, G: {s}", {}) for s in sources]  # noqa: S307 - dynamo's
        # inputs read from modules (or globals) are the same on every call with those modules
        self.fixed, self.per_call = [], []
        for i, source in enumerate(sources):
            root = _ROOT.match(source)
            if root is None or root.group(1) in modules:
                self.fixed.append(i)
            else:
                self.per_call.append((i, self.getters[i]))
        self.inputs: dict[tuple, tuple] = {}  # ids of the module arguments -> (them, inputs)

    def flat(self, args) -> list:
        local = dict(zip(self.names, args))
        mods = tuple(args[i] for i in self.module_args)
        key = tuple(map(id, mods))
        held = self.inputs.get(key)
        if held is None:  # the modules are held with their inputs, so their ids stay theirs
            fixed = [self.getters[i](local, self.globals) for i in self.fixed]
            held = self.inputs[key] = (mods, fixed)
        flat = [None] * len(self.getters)
        for i, value in zip(self.fixed, held[1]):
            flat[i] = value
        for i, get in self.per_call:
            flat[i] = get(local, self.globals)
        return flat

    def __call__(self, args):
        out = self.compiled(*self.flat(args))
        return out[0] if self.single else tuple(out)


class _Opaque(Exception):
    """An argument `_signature` cannot describe."""


def _signature(obj):
    """What dynamo's guards check of a call's arguments (modules aside: `compiled_for` gives
    each description its own function), the dimensions marked dynamic left out; `_Opaque` for
    an argument of another kind, whose call then never borrows another caller's graph."""
    if isinstance(obj, torch.Tensor):
        dynamic = getattr(obj, "_dynamo_dynamic_indices", ())
        shape = tuple(None if i in dynamic else n for i, n in enumerate(obj.shape))
        layout = obj.is_contiguous() if dynamic else obj.stride()
        return shape, layout, obj.dtype, obj.device.type
    if isinstance(obj, nn.Module):
        return None
    if isinstance(obj, (tuple, list)):
        return tuple(map(_signature, obj))
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise _Opaque(type(obj).__name__)


def _leaves(out) -> list | None:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple) and all(isinstance(t, torch.Tensor) for t in out):
        return list(out)
    return None


class DirectCalls:
    """Calls a `compiled_for` function's graphs without dynamo once each is traced.

    `key(*args)` names the graph a call needs: calls with equal keys must agree in every
    argument's shape, dtype and None-ness outside the dimensions marked dynamic, and pass modules
    whose tensors are never reassigned (weights load before the first step). Calls run under
    inference mode, as steps do; a key whose call broke into several graphs, or whose direct
    call differs from dynamo's by a bit, stays on dynamo's path.
    """

    def __init__(self, fn, *roots: nn.Module, key) -> None:
        self.compiled, self.fn, self.key = compiled_for(fn, *roots), fn, key
        self.graphs: dict = {}  # key -> _Graph, or None where calls go through dynamo

    def __call__(self, *args):
        key = self.key(*args)
        graph = self.graphs.get(key)
        if graph is not None:
            return graph(args)
        _TRACED.clear()
        out = self.compiled(*args)
        if key not in self.graphs:
            # a graph traced for an earlier call with the same signature (another model described
            # alike, in this process) is the graph dynamo ran
            traced = list(_TRACED)
            try:
                signature = (self.compiled, _signature(args))
            except _Opaque:
                signature = None
            if len(traced) == 1 and signature is not None:
                _GRAPHS[signature] = traced[0]
            elif not traced and signature in _GRAPHS:
                traced = [_GRAPHS[signature]]
            self.graphs[key] = self._checked(traced, args, out)
        _TRACED.clear()
        return out

    def _checked(self, traced, args, out) -> _Graph | None:
        leaves = _leaves(out)
        if len(traced) != 1 or leaves is None or not torch.is_inference_mode_enabled():
            return None
        try:
            graph = _Graph(*traced[0], self.fn, args, isinstance(out, torch.Tensor))
            # the same call again (a decode step's KV writes are the same values to the same
            # slots): its outputs must be the traced call's, bit for bit
            again = graph.compiled(*graph.flat(args))
        except Exception as e:  # noqa: BLE001 - an input dynamo names in a way not evaluable
            log.warning("compiled graph called through dynamo (%s: %s)", type(e).__name__, e)
            return None
        if len(again) != len(leaves) or not all(map(torch.equal, again, leaves)):
            log.warning("compiled graph called through dynamo: a direct call differed")
            return None
        return graph
