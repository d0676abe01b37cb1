"""Broken checkpoint folders: each must fail the shard's start with one typed error whose message
names the folder, file, field or tensor to fix. A valid tiny Llama checkpoint is saved once and
copied per test, then broken."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from layers.attention.backend import select_backend
from layers.parallel import ParallelContext, ShardingError
from shards.checkpoint import CheckpointError
from shards.loader import LoadError, load_weights
from shards.model_config import ModelConfigError, load_model_config
from shards.models.base import BuildContext
from shards.models.registry import UnknownArchitectureError, model_class, supported_architectures
from tests.support.tiny import build_hf_model, make_worker, save_checkpoint, tiny_config

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    hf = build_hf_model(tiny_config("llama"))
    root = tmp_path_factory.mktemp("pristine")
    return {
        fmt: save_checkpoint(hf, root / fmt, fmt)
        for fmt in ("safetensors", "bin", "sharded-safetensors")
    }


def _copy(pristine: dict[str, Path], tmp_path: Path, fmt: str = "safetensors") -> Path:
    return Path(shutil.copytree(pristine[fmt], tmp_path / "model"))


@pytest.fixture
def folder(pristine, tmp_path) -> Path:
    return _copy(pristine, tmp_path)


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / WEIGHTS
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _names(text: str) -> str:
    return re.escape(text)


def test_valid_copy_loads(folder):
    assert make_worker(folder).load_report["tensors"] > 0


# --- the folder ------------------------------------------------------------------------------


def test_folder_without_weights_names_folder(folder):
    (folder / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=_names(f"{folder}: no model weights")):
        make_worker(folder)


def test_folder_without_config_json_names_folder(folder):
    (folder / "config.json").unlink()
    with pytest.raises(ModelConfigError, match=_names(f"{folder}: no config.json")):
        make_worker(folder)


def test_missing_folder_names_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelConfigError, match=_names(f"{missing}: no config.json")):
        make_worker(missing)


def test_config_json_that_is_not_json_names_file(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match=_names(f"{folder / 'config.json'}: not valid JSON")):
        make_worker(folder)


# --- config.json -----------------------------------------------------------------------------


def test_unknown_architecture_lists_supported(folder):
    _edit_config(folder, lambda raw: raw.update(architectures=["FancyForCausalLM"]))
    with pytest.raises(UnknownArchitectureError, match="'FancyForCausalLM' is not supported") as e:
        make_worker(folder)
    assert supported_architectures(), "the registry must know some architectures"
    for arch in supported_architectures():
        assert arch in str(e.value)


@pytest.mark.parametrize(
    "field",
    ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"],
)
def test_config_missing_required_field_names_field(folder, field):
    _edit_config(folder, lambda raw: raw.pop(field))
    with pytest.raises(ModelConfigError, match=f"config.json: required field '{field}' is missing"):
        make_worker(folder)


def test_config_without_architectures_names_field(folder):
    _edit_config(folder, lambda raw: raw.pop("architectures"))
    with pytest.raises(ModelConfigError, match="config.json: field 'architectures' is missing"):
        make_worker(folder)


def test_unsupported_activation_names_value(folder):
    _edit_config(folder, lambda raw: raw.update(hidden_act="gelu"))
    with pytest.raises(ModelConfigError, match="hidden_act 'gelu' is not supported"):
        make_worker(folder)


def test_tensor_parallel_size_not_dividing_heads_names_numbers(folder):
    # 4 attention heads in the tiny config; rank 0 of 3 builds (and fails) on its own.
    with pytest.raises(ShardingError, match="tensor parallel size 3 does not divide 4 attention"):
        make_worker(folder, rank=0, world_size=3)


def test_corrupt_generation_config_names_file(folder):
    path = folder / "generation_config.json"
    path.write_text("")  # e.g. an interrupted download
    with pytest.raises(ModelConfigError, match=_names(str(path))):
        make_worker(folder)


def test_non_numeric_config_field_names_field(folder):
    _edit_config(folder, lambda raw: raw.update(hidden_size="sixty-four"))
    with pytest.raises(ModelConfigError, match="'hidden_size'"):
        make_worker(folder)


# --- weight files ----------------------------------------------------------------------------


def test_truncated_safetensors_names_file(folder):
    path = folder / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=_names(f"{path}: cannot read safetensors file")):
        make_worker(folder)


def test_truncated_bin_names_file(pristine, tmp_path):
    folder = _copy(pristine, tmp_path, "bin")
    path = folder / "pytorch_model.bin"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=_names(f"{path}: cannot read PyTorch checkpoint")):
        make_worker(folder)


def test_sharded_index_listing_missing_file_names_index_and_file(pristine, tmp_path):
    folder = _copy(pristine, tmp_path, "sharded-safetensors")
    (folder / "model-00002-of-00002.safetensors").unlink()
    index = folder / "model.safetensors.index.json"
    want = f"{index}: lists model-00002-of-00002.safetensors, which is missing"
    with pytest.raises(CheckpointError, match=_names(want)):
        make_worker(folder)


def test_sharded_index_naming_unknown_file_names_it(pristine, tmp_path):
    folder = _copy(pristine, tmp_path, "sharded-safetensors")
    index = folder / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    raw["weight_map"]["lm_head.weight"] = "model-00003-of-00002.safetensors"
    index.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="lists model-00003-of-00002.safetensors, which is"):
        make_worker(folder)


def test_sharded_index_without_weight_map_names_index(pristine, tmp_path):
    folder = _copy(pristine, tmp_path, "sharded-safetensors")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=_names(f"{index}: no 'weight_map'")):
        make_worker(folder)


def test_sharded_index_that_is_not_an_object_names_index(pristine, tmp_path):
    folder = _copy(pristine, tmp_path, "sharded-safetensors")
    index = folder / "model.safetensors.index.json"
    index.write_text("[]")
    with pytest.raises(CheckpointError, match=_names(f"{index}: no 'weight_map'")):
        make_worker(folder)


# --- tensors ---------------------------------------------------------------------------------

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def test_mismatched_shape_names_tensor_and_both_shapes(folder):
    _edit_tensors(folder, lambda state: state.update({Q_PROJ: torch.zeros(32, 64)}))
    want = f"{folder / WEIGHTS}: tensor '{Q_PROJ}' has shape [32, 64], expected [64, 64]"
    with pytest.raises(LoadError, match=_names(want)):
        make_worker(folder)


def test_mismatched_shape_on_a_later_rank_reports_global_shapes(folder):
    # Rank 1 of 2's model loads in-process (loading needs no process group); it must compare and
    # report the whole checkpoint tensor's shape, not its own slice.
    _edit_tensors(folder, lambda state: state.update({Q_PROJ: torch.zeros(32, 64)}))
    cfg = load_model_config(folder)
    bc = BuildContext(
        pctx=ParallelContext(rank=1, world_size=2),
        dtype=torch.float32,
        device=torch.device("cpu"),
        backend=select_backend(torch.device("cpu"), torch.float32),
        max_position=cfg.max_position_embeddings,
    )
    model = model_class(cfg.architecture)(cfg, bc)
    with pytest.raises(
        LoadError, match=_names(f"'{Q_PROJ}' has shape [32, 64], expected [64, 64]")
    ):
        load_weights(model, str(folder), progress=False)


def test_mismatched_vocab_rows_names_tensor_and_both_shapes(folder):
    name = "model.embed_tokens.weight"
    _edit_tensors(folder, lambda state: state.update({name: torch.zeros(170, 64)}))
    with pytest.raises(
        LoadError, match=_names(f"'{name}' has shape [170, 64], expected [160, 64]")
    ):
        make_worker(folder)


def test_mismatched_replicated_shape_names_tensor(folder):
    name = "model.norm.weight"
    _edit_tensors(folder, lambda state: state.update({name: torch.ones(65)}))
    with pytest.raises(LoadError, match=_names(f"'{name}' has shape [65], expected [64]")):
        make_worker(folder)


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.1.mlp.down_proj.weight",  # row parallel
        "model.layers.1.self_attn.k_proj.weight",  # one slot of the fused QKV
        "model.layers.0.mlp.up_proj.weight",  # one slot of the fused gate/up
        "model.layers.1.post_attention_layernorm.weight",  # replicated
        "model.embed_tokens.weight",
        "lm_head.weight",
    ],
)
def test_missing_tensor_names_checkpoint_tensor(folder, name):
    _edit_tensors(folder, lambda state: state.pop(name))
    with pytest.raises(LoadError, match=_names(f"checkpoint is missing tensor '{name}'")):
        make_worker(folder)


def test_unexpected_tensor_names_it_and_file(folder):
    name = "model.layers.0.mlp.extra_proj.weight"
    _edit_tensors(folder, lambda state: state.update({name: torch.zeros(4, 4)}))
    with pytest.raises(LoadError, match=_names(f"{folder / WEIGHTS}: unexpected tensor '{name}'")):
        make_worker(folder)


def test_tensor_for_layer_beyond_config_names_it(folder):
    # A checkpoint with more layers than config.json's num_hidden_layers (2).
    name = "model.layers.2.mlp.down_proj.weight"
    _edit_tensors(folder, lambda state: state.update({name: torch.zeros(64, 128)}))
    with pytest.raises(LoadError, match=_names(f"tensor '{name}' maps to")):
        make_worker(folder)


def test_fewer_layers_in_config_than_checkpoint_is_an_error(folder):
    _edit_config(folder, lambda raw: raw.update(num_hidden_layers=1))
    with pytest.raises(LoadError, match=r"tensor 'model\.layers\.1\.[a-z_.]+' maps to"):
        make_worker(folder)


def test_more_layers_in_config_than_checkpoint_names_first_missing(folder):
    _edit_config(folder, lambda raw: raw.update(num_hidden_layers=3))
    with pytest.raises(LoadError, match=r"missing tensor 'model\.layers\.2\."):
        make_worker(folder)
