"""llama.cpp's `llama-server` as the benchmarks' CPU yardstick: its command line, and a GGUF of
the very checkpoint we serve, written once with llama.cpp's own converter and quantizer.

The binary is the user's build (`cmake -B build && cmake --build build -t llama-server
llama-quantize` in a llama.cpp checkout). The converter is that checkout's
`convert_hf_to_gguf.py`, found by walking up from the binary, run with its own `gguf-py` on the
path (it needs numpy, torch, transformers and sentencepiece, which the benchmark's interpreter
has once `pip install sentencepiece` is done).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("shardserve.bench")

# What each GGUF type is compared with: Q8_0 (int8, one scale per 32 weights) with `ifq`,
# Q4_0 / Q4_1 (4 bits, one scale (and minimum) per 32) with `ifq_nf4`.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes itself
QUANTIZER_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m")  # through llama-quantize, from f16
GGUF_TYPES = CONVERTER_TYPES + QUANTIZER_TYPES


def server_cmd(server: str, gguf: str, port: int, slots: int, threads: int) -> list[str]:
    # One slot per concurrent request; the context is shared by the slots.
    return [
        server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
        "-np", str(slots), "-c", str(slots * 2048), "-t", str(threads), "--no-webui",
    ]  # fmt: skip


def checkout_of(server: str) -> Path:
    """The llama.cpp source tree a `llama-server` binary was built in."""
    binary = Path(server).resolve()
    for folder in binary.parents:
        if (folder / "convert_hf_to_gguf.py").is_file():
            return folder
    raise SystemExit(
        f"no convert_hf_to_gguf.py above {binary}: pass --gguf, or a llama-server built inside "
        "its llama.cpp checkout"
    )


def ensure_gguf(folder: str, gguf_type: str, server: str) -> Path:
    """`folder` as a GGUF of `gguf_type`, written beside the cache's other conversions on first
    use (a temporary name renamed into place, so an interrupted run leaves nothing half
    written)."""
    from launcher.embedded import cache_dir

    if gguf_type not in GGUF_TYPES:
        raise SystemExit(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    out_dir = cache_dir() / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{Path(folder).resolve().name}-{gguf_type}.gguf"
    if out.exists():
        log.info("GGUF %s (cached)", out)
        return out
    checkout = checkout_of(server)
    start = time.monotonic()
    if gguf_type in CONVERTER_TYPES:
        _convert(checkout, folder, gguf_type, out)
    else:
        f16 = ensure_gguf(folder, "f16", server)
        quantizer = Path(server).resolve().with_name("llama-quantize")
        if not quantizer.is_file():
            raise SystemExit(f"{quantizer} not found: build llama.cpp's llama-quantize target")
        tmp = out.with_suffix(".tmp")
        log.info("quantizing %s to %s with %s", f16.name, gguf_type.upper(), quantizer)
        _run([str(quantizer), str(f16), str(tmp), gguf_type.upper()])
        tmp.rename(out)
    log.info("GGUF %s written in %.0f s", out, time.monotonic() - start)
    return out


def _convert(checkout: Path, folder: str, gguf_type: str, out: Path) -> None:
    tmp = out.with_suffix(".tmp")
    log.info("converting %s to GGUF %s with %s", folder, gguf_type, checkout)
    env = {**os.environ, "PYTHONPATH": str(checkout / "gguf-py")}
    cmd = [sys.executable, str(checkout / "convert_hf_to_gguf.py"), folder]
    _run([*cmd, "--outtype", gguf_type, "--outfile", str(tmp)], env)
    tmp.rename(out)


def _run(cmd: list[str], env: dict | None = None) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        raise SystemExit(f"{' '.join(cmd[:2])} failed ({proc.returncode}):\n{tail}")
