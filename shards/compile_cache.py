"""torch.compile'd functions without per-call module guards, shared by look-alike modules.

By default a compiled function re-checks, on every call, every attribute of every module it
read: ~45 us per decoder layer here, a sixth of a single-stream decode step. `compiled_for`
drops the modules' guards (tensors passed as arguments keep theirs) and instead gives module
trees whose descriptions differ (`_describe`: types, plain attributes, tensor shapes, strides
and dtypes) a function of their own, with its own code object and so its own compile cache.
A graph is thus only ever reused for modules described exactly like the ones it was traced
from, in this model or any other the process loads.
"""

from __future__ import annotations

import types

import torch
from torch import nn

# Dynamo's guards already check every tensor argument's sizes and strides before a graph runs;
# the generated code's own size asserts repeat that, ~15 us per decoder layer here.
_OPTIONS = {
    "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
    "size_asserts": False,
}
_COMPILED: dict[tuple, object] = {}  # (function name, description) -> compiled function


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
        _COMPILED[key] = torch.compile(copy, dynamic=False, options=_OPTIONS)
    return _COMPILED[key]
