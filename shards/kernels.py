"""Hand-written CPU kernels: built with the machine's C++ compiler (the one torch.compile uses)
the first time a shard needs them, cached beside torch's own compiled code, and loaded as torch
ops that layers/ call where they are registered. Without a compiler, or on a CPU without AVX2,
nothing is registered and the layers keep their plain-torch paths.

    layers/quant/gemv.cpp   shardserve_kernels::int8_linear, the GEMV of few-token steps
                            over int8 weights
    layers/quant/expand.cpp shardserve_kernels::int8_expand, nf4_blocks_expand and
                            int8_blocks_expand, quantized rows to bfloat16 for the GEMMs of
                            many tokens
    layers/quant/blocks.cpp shardserve_kernels::nf4_blocks_linear and int8_blocks_linear, the
                            NF4 and int8 matmuls of up to a few hundred tokens, laid out 16
                            rows at a time
    layers/attention/paged_decode.cpp
                            shardserve_kernels::paged_decode, decode attention over the
                            paged KV cache in place
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import layers

log = logging.getLogger("shardserve.kernels")

_LAYERS = Path(layers.__file__).parent
SOURCES = (
    _LAYERS / "quant" / "gemv.cpp",
    _LAYERS / "quant" / "expand.cpp",
    _LAYERS / "quant" / "blocks.cpp",
    _LAYERS / "attention" / "paged_decode.cpp",
)
HEADERS = (_LAYERS / "bf16.h",)  # part of the cache key, not of the command
ISA_NAMES = {1: "AVX2", 2: "AVX-512 VNNI"}
ISA_KERNELS = {1: "int8", 2: "int8 and NF4"}
_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp")


class KernelBuildError(RuntimeError):
    pass


def _compiler() -> str | None:
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        name = get_cpp_compiler()
    except Exception:  # noqa: BLE001 - torch's search raises when it finds none
        return None
    return shutil.which(name)


def _command(compiler: str, sources: tuple[Path, ...], out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    lib = library_paths()[0]
    return [
        compiler, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in include_paths()), *map(str, sources), "-o", str(out),
        f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip


def _cache_path(compiler: str, sources: tuple[Path, ...]) -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    key = hashlib.sha256()
    texts = [source.read_bytes() for source in (*sources, *HEADERS)]
    for part in (*texts, torch.__version__.encode(), compiler.encode(), *_FLAGS):
        key.update(part if isinstance(part, bytes) else part.encode())
    return Path(cache_dir()) / "shardserve" / f"kernels-{key.hexdigest()[:16]}.so"


def build(sources: tuple[Path, ...] = SOURCES, compiler: str | None = None) -> Path:
    """The shared library of `sources`, compiled now unless the cache has it."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise KernelBuildError("no C++ compiler found")
    path = _cache_path(compiler, sources)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # a file of its own, renamed into place: shards building at once never load a partial one
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        try:
            command = _command(compiler, sources, Path(tmp))
            done = subprocess.run(command, capture_output=True, text=True)
        except OSError as e:
            raise KernelBuildError(f"cannot run {compiler}: {e}") from e
        if done.returncode != 0:
            raise KernelBuildError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    names = ", ".join(source.name for source in sources)
    log.info("built %s in %.1fs (%s)", names, time.monotonic() - started, path)
    return path


_loaded: Path | None = None


def load(compiler: str | None = None) -> bool:
    """Register the kernels in this process (once). False, with the reason logged, where they
    cannot be built or this CPU cannot run them."""
    global _loaded
    if _loaded is not None:
        return True
    try:
        path = build(compiler=compiler)
    except KernelBuildError as e:
        log.warning("CPU kernels unavailable (%s): quantized decode steps use torch's paths", e)
        return False
    torch.ops.load_library(str(path))
    isa = torch.ops.shardserve_kernels.int8_mm_isa()
    if isa not in ISA_NAMES:
        log.warning("CPU kernels unavailable: this CPU has no AVX2")
        return False

    @torch.library.register_fake("shardserve_kernels::int8_mm")
    def _(a, b, isa=0):
        return a.new_empty(a.shape[0], b.shape[0], dtype=torch.int32)

    @torch.library.register_fake("shardserve_kernels::int8_linear")
    def _(x, b, scale, isa=0):
        return x.new_empty(x.shape[0], b.shape[0])

    @torch.library.register_fake("shardserve_kernels::nf4_blocks_linear")
    def _(x, blocks, scales, levels):
        return x.new_empty(x.shape[0], blocks.shape[0] * blocks.shape[3])

    @torch.library.register_fake("shardserve_kernels::int8_blocks_linear")
    def _(x, blocks, scale):
        return x.new_empty(x.shape[0], blocks.shape[0] * blocks.shape[3])

    @torch.library.register_fake("shardserve_kernels::paged_decode")
    def _(q, k_cache, v_cache, block_ids, positions, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    _loaded = path
    from layers.quant.expand import expand_available

    expand = ", bfloat16 GEMMs on expanded tiles past 32 tokens" if expand_available() else ""
    log.info("CPU kernels: %s GEMVs%s, %s", ISA_KERNELS[isa], expand, ISA_NAMES[isa])
    return True
