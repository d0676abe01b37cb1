"""Which model folder to serve, checked before any process starts."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from launcher.config import DEFAULT_MODEL_PATH, Config, ConfigError
from shards.checkpoint import CheckpointError, find_weight_files
from shards.model_config import ModelConfig, ModelConfigError, load_model_config
from shards.models.registry import UnknownArchitectureError, check_architecture

log = logging.getLogger("shardserve.launcher")


@dataclass(frozen=True)
class ResolvedModel:
    path: str
    name: str
    config: ModelConfig
    embedded: bool


def resolve_model(config: Config) -> ResolvedModel:
    path = config.model_path
    embedded = False
    if path == DEFAULT_MODEL_PATH and not os.path.exists(path):
        from launcher.embedded import EMBEDDED_NAME, ensure_embedded_model

        log.info(
            "MODEL_PATH is the default %s, which does not exist: serving the embedded default "
            "model %s",
            DEFAULT_MODEL_PATH,
            EMBEDDED_NAME,
        )
        path = str(ensure_embedded_model())
        embedded = True
    if not os.path.isdir(path):
        raise ConfigError(f"--model-path {path}: no such folder")
    try:
        cfg = load_model_config(path)
        check_architecture(cfg.architecture)
        _check_weights(path, config.quantization)
    except (ModelConfigError, UnknownArchitectureError, CheckpointError) as e:
        raise ConfigError(f"--model-path {path}: {e}") from e
    for note in cfg.notes:
        log.info("%s", note)
    if embedded:
        from launcher.embedded import EMBEDDED_NAME

        default_name = EMBEDDED_NAME
    else:
        default_name = os.path.basename(os.path.normpath(path))
    return ResolvedModel(path, config.model_id or default_name, cfg, embedded)


def _check_weights(path: str, quantization: str) -> None:
    """A folder may hold only the SmoothQuant file (the spec lets users delete the originals);
    then only the modes that read it can serve it."""
    from layers.quant.smoothquant import SMOOTHQUANT_FILE

    try:
        find_weight_files(path)
    except CheckpointError as e:
        if not os.path.isfile(os.path.join(path, SMOOTHQUANT_FILE)):
            raise
        if quantization not in ("smoothquant", "auto"):
            raise CheckpointError(
                f"{e}; it holds only {SMOOTHQUANT_FILE}, which QUANTIZATION=smoothquant or "
                f"auto serves (not {quantization})"
            ) from e
