"""Fill a model's parameters from a checkpoint, reading only this rank's slices.

Each checkpoint tensor is matched to a `WeightRule` of the model; the target layer says which
slice of it this rank holds (`slice_for`) and what shape the whole tensor must have
(`checkpoint_shape`). Anything unmatched, mis-shaped or left unfilled is a `LoadError` naming
the tensor.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import resource
import time

from torch import nn
from tqdm import tqdm

from layers.linear import INPUT_VECTOR, WHOLE, ParallelLinear, Split
from shards import logs
from shards.checkpoint import CheckpointReader

log = logging.getLogger("shardserve.loader")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


class LoadError(ValueError):
    pass


def name_pattern(name: str) -> tuple[str, str | None]:
    """A checkpoint name with its layer index replaced by `{i}`, and that index."""
    m = _LAYER_INDEX.search(name)
    if not m:
        return name, None
    return name[: m.start()] + ".{i}." + name[m.end() :], m.group(1)


def _expected_shape(module: nn.Module, pname: str, slots: tuple[str, ...], param) -> tuple:
    if not hasattr(module, "checkpoint_shape"):
        return tuple(param.shape)
    shapes = [module.checkpoint_shape(pname, s) for s in slots]
    if len(shapes) == 1 or pname == INPUT_VECTOR:  # one input vector serves every fused slot
        return shapes[0]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def load_weights(model: nn.Module, folder: str, progress: bool = True) -> dict:
    """Load `folder` into `model`; returns a small report (tensors, bytes, seconds)."""
    modules = dict(model.named_modules())
    rules = _stored_rules(model.weight_rules(), modules)
    reader = CheckpointReader(folder, _checkpoint_file(modules))
    skipped = set(model.skipped_weights())
    filled: set[tuple[int, str]] = set()
    finalized: set[int] = set()
    started = time.monotonic()
    num_bytes = 0
    num_tensors = 0
    progress = progress and logs.progress_bars()
    bar = tqdm(desc="loading weights", unit="tensor", disable=not progress, mininterval=1.0)
    for file, name, handle in reader.tensors():
        bar.update(1)
        pattern, idx = name_pattern(name)
        rule = rules.get(pattern)
        if rule is None:
            if pattern in skipped:
                continue
            raise LoadError(
                f"{reader.folder / file}: unexpected tensor {name!r}: "
                f"{type(model).__name__} has no parameter for it"
            )
        target = rule.target.format(i=idx)
        module_path, pname = target.rsplit(".", 1)
        module = modules.get(module_path)
        param = getattr(module, pname, None) if module is not None else None
        if param is None:
            raise LoadError(f"{file}: tensor {name!r} maps to {target!r}, which the model lacks")
        layer_split = getattr(module, "split", Split.REPLICATED)
        if layer_split != rule.split:
            raise LoadError(
                f"weight map of {type(model).__name__}: {name!r} declared {rule.split.value} "
                f"but {target!r} is {layer_split.value}"
            )
        slots = rule.fused or (rule.slot,)
        expected = _expected_shape(module, pname, slots, param)
        if handle.shape() != tuple(expected):
            raise LoadError(
                f"{reader.folder / file}: tensor {name!r} has shape {list(handle.shape())}, "
                f"expected {list(expected)}"
            )
        offset = 0
        for slot in slots:
            spec = module.slice_for(pname, slot) if hasattr(module, "slice_for") else WHOLE
            src = handle.read(spec, offset)
            dst = (
                param.data
                if spec.dim is None
                else param.data.narrow(spec.dim, spec.dst_start, spec.length)
            )
            if tuple(src.shape) != tuple(dst.shape):
                raise LoadError(
                    f"{reader.folder / file}: slice of {name!r} has shape {list(src.shape)}, "
                    f"{target!r} slot {slot!r} needs {list(dst.shape)}"
                )
            dst.copy_(src)
            num_bytes += dst.numel() * dst.element_size()
            filled.add((id(param), slot))
            if rule.fused:
                offset += module.checkpoint_shape(pname, slot)[0]
        num_tensors += 1
        if hasattr(module, "finalize_weights") and _complete(module, filled):
            # Quantize (or repack) each layer as soon as it is whole, so the float copies of
            # the whole model never sit in memory at once.
            module.finalize_weights()
            finalized.add(id(module))
    bar.close()
    _check_filled(model, filled, rules)
    for module in model.modules():
        if hasattr(module, "finalize_weights") and id(module) not in finalized:
            module.finalize_weights()
    report = {
        "tensors": num_tensors,
        "bytes": num_bytes,
        "seconds": time.monotonic() - started,
        "peak_rss_bytes": _peak_rss(),
    }
    log.info(
        "loaded %d tensors (%.1f MiB for this rank) from %s in %.1fs; peak process memory %.1f MiB",
        num_tensors,
        num_bytes / 2**20,
        folder,
        report["seconds"],
        report["peak_rss_bytes"] / 2**20,
    )
    return report


def _linear_for(rule, modules: dict[str, nn.Module]) -> ParallelLinear | None:
    module_path, pname = rule.target.rsplit(".", 1)
    module = modules.get(module_path.replace("{i}", "0"))
    return module if pname == "weight" and isinstance(module, ParallelLinear) else None


def _stored_rules(rules: dict, modules: dict[str, nn.Module]) -> dict:
    """The model's rules, with each linear's `.weight` replaced by the tensors its quant mode
    stores in the checkpoint (`.qweight`, `.weight_scale`, ... for a pre-quantized file)."""
    out = {}
    for pattern, rule in rules.items():
        linear = _linear_for(rule, modules)
        if linear is None or linear.quant.stored_params == ("weight",):
            out[pattern] = rule
            continue
        base, target = pattern.removesuffix(".weight"), rule.target.removesuffix(".weight")
        for p in linear.quant.stored_params:
            out[f"{base}.{p}"] = dataclasses.replace(rule, target=f"{target}.{p}")
    return out


def _checkpoint_file(modules: dict[str, nn.Module]) -> str | None:
    """A pre-quantized mode reads its own file instead of the model's weights."""
    linears = [m for m in modules.values() if isinstance(m, ParallelLinear)]
    files = {m.quant.checkpoint_file for m in linears if m.quant.checkpoint_file}
    return files.pop() if files else None


def _complete(module: nn.Module, filled: set[tuple[int, str]]) -> bool:
    slots = module.slots() if hasattr(module, "slots") else {"": 0}
    return all((id(p), slot) in filled for p in module.parameters(recurse=False) for slot in slots)


def _peak_rss() -> int:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _check_filled(model: nn.Module, filled: set[tuple[int, str]], rules) -> None:
    sources: dict[str, str] = {}
    for pattern, rule in rules.items():
        for slot in rule.fused or (rule.slot,):
            sources[f"{rule.target}:{slot}"] = pattern
    for module_path, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            slots = module.slots() if hasattr(module, "slots") else {"": 0}
            for slot in slots:
                if (id(param), slot) in filled:
                    continue
                target, idx = name_pattern(f"{module_path}.{pname}")
                source = sources.get(f"{target}:{slot}", target).replace("{i}", idx or "{i}")
                raise LoadError(
                    f"checkpoint is missing tensor {source!r} (for parameter "
                    f"{module_path}.{pname}{f' slot {slot}' if slot else ''})"
                )
