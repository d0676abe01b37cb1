"""Read tensors from a checkpoint folder one rank-slice at a time.

Formats: `.safetensors` (single, or sharded with `model.safetensors.index.json`) read with
`safe_open(...).get_slice`, so only the requested slice is read; `.bin` (single, or sharded with
`pytorch_model.bin.index.json`) memory-mapped with `torch.load(mmap=True, weights_only=True)`,
so only the pages of the slice are touched.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from layers.linear import SliceSpec

# Files that sit beside a checkpoint but are not part of it (the SmoothQuant file is a separate
# checkpoint; `consolidated` is Mistral's original-format duplicate of the weights).
_NOT_WEIGHTS = ("smoothq_", "consolidated")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and, when known, the tensor."""


def _index(folder: Path, name: str) -> dict[str, str] | None:
    path = folder / name
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: no 'weight_map' object mapping tensor names to files")
    return weight_map


def find_weight_files(folder: str | Path) -> tuple[str, dict[str, list[str]]]:
    """(format, {file: [tensor names or empty = all]}) for the folder's weights."""
    folder = Path(folder)
    for fmt, index_name, pattern in (
        ("safetensors", "model.safetensors.index.json", "*.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "*.bin"),
    ):
        weight_map = _index(folder, index_name)
        if weight_map is not None:
            files: dict[str, list[str]] = {}
            for tensor, file in weight_map.items():
                files.setdefault(file, []).append(tensor)
            for file in files:
                if not (folder / file).is_file():
                    raise CheckpointError(f"{folder / index_name}: lists {file}, which is missing")
            return fmt, files
        found = sorted(
            p.name
            for p in folder.glob(pattern)
            if not p.name.startswith(_NOT_WEIGHTS) and p.name != "training_args.bin"
        )
        if found:
            return fmt, {f: [] for f in found}
    raise CheckpointError(f"{folder}: no model weights (*.safetensors or *.bin) found")


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e


class CheckpointReader:
    """The folder's model weights, or only `file` (a safetensors checkpoint beside them, such as
    the SmoothQuant file) when given."""

    def __init__(self, folder: str | Path, file: str | None = None) -> None:
        self.folder = Path(folder)
        if file is None:
            self.format, self.files = find_weight_files(self.folder)
        elif not (self.folder / file).is_file():
            raise CheckpointError(f"{self.folder}: no {file}")
        else:
            self.format, self.files = "safetensors", {file: []}

    def tensors(self) -> Iterator[tuple[str, str, TensorHandle]]:
        """(file, tensor name, handle) for every tensor, one file open at a time."""
        for file in self.files:
            path = self.folder / file
            if self.format == "safetensors":
                yield from self._safetensors(path)
            else:
                yield from self._bin(path)

    def _safetensors(self, path: Path):
        try:
            handle = safe_open(str(path), framework="pt")
            names = list(handle.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
        for name in names:
            yield path.name, name, _SafeSlice(path, name, handle.get_slice(name))

    def _bin(self, path: Path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # pickle and zip errors have no common base class
            raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({e})") from e
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
        for name, tensor in state.items():
            yield path.name, name, _BinSlice(path, name, tensor)
        del state


class TensorHandle:
    path: Path
    name: str

    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, spec: SliceSpec, offset: int = 0) -> torch.Tensor:
        """The slice `spec` describes, shifted by `offset` along its dim (for pre-fused tensors)."""
        raise NotImplementedError

    def _check(self, spec: SliceSpec, offset: int) -> None:
        if spec.dim is not None:
            end = offset + spec.src_start + spec.length
            if end > self.shape()[spec.dim]:
                raise CheckpointError(
                    f"{self.path}: tensor {self.name!r} has shape {list(self.shape())}, "
                    f"too small to slice [{offset + spec.src_start}:{end}] on dim {spec.dim}"
                )


class _SafeSlice(TensorHandle):
    def __init__(self, path: Path, name: str, sl) -> None:
        self.path, self.name, self._slice = path, name, sl

    def shape(self) -> tuple[int, ...]:
        return tuple(self._slice.get_shape())

    def read(self, spec: SliceSpec, offset: int = 0) -> torch.Tensor:
        self._check(spec, offset)
        try:
            if spec.dim is None:
                return self._slice[:]
            start = offset + spec.src_start
            index = [slice(None)] * spec.dim + [slice(start, start + spec.length)]
            return self._slice[tuple(index)]
        except Exception as e:  # truncated data surfaces here, as a safetensors error
            raise CheckpointError(f"{self.path}: cannot read tensor {self.name!r} ({e})") from e


class _BinSlice(TensorHandle):
    def __init__(self, path: Path, name: str, tensor: torch.Tensor) -> None:
        self.path, self.name, self._tensor = path, name, tensor

    def shape(self) -> tuple[int, ...]:
        return tuple(self._tensor.shape)

    def read(self, spec: SliceSpec, offset: int = 0) -> torch.Tensor:
        self._check(spec, offset)
        if spec.dim is None:
            return self._tensor
        return self._tensor.narrow(spec.dim, offset + spec.src_start, spec.length)
