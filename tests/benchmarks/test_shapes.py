"""The random-weight checkpoints of real shapes (benchmarks/shapes.py), written shard by shard:
the index names every tensor, no shard outgrows its bound by more than one tensor, and the
folder loads through our loader, the same weights from safetensors and from `.bin`."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.shapes import VOCAB, config, tensor_shapes, write_checkpoint
from tests.support.tiny import make_worker, our_logits

SHARD_BYTES = 48 * 2**20


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return {
        fmt: write_checkpoint(
            root / fmt, "smollm2-135m", "bfloat16", fmt, SHARD_BYTES, progress=False
        )
        for fmt in ("safetensors", "bin")
    }


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_index_names_every_tensor_and_shards_stay_bounded(folders, fmt):
    folder = folders[fmt]
    prefix = "model" if fmt == "safetensors" else "pytorch_model"
    index = json.loads((folder / f"{prefix}.{fmt}.index.json").read_text())
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg == config("smollm2-135m", "bfloat16") and cfg["vocab_size"] == VOCAB
    names = [name for name, _ in tensor_shapes(cfg)]
    assert sorted(index["weight_map"]) == sorted(names)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and all((folder / f).is_file() for f in files)
    largest = 2 * VOCAB * cfg["hidden_size"]  # the embedding, in bfloat16
    assert all((folder / f).stat().st_size <= SHARD_BYTES + largest for f in files)
    assert (folder / "tokenizer.json").is_file()


def test_both_formats_load_the_same_weights(folders):
    tokens = [1, 510, 2071, 33, 940, 17]
    logits = {
        fmt: our_logits(
            make_worker(folder, dtype="float32", max_model_len=64, kv_kib=8192), tokens, 4
        )
        for fmt, folder in folders.items()
    }
    assert torch.isfinite(logits["safetensors"]).all()
    assert torch.equal(logits["safetensors"], logits["bin"])
