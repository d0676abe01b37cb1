"""The compute dtype: the CPU default follows what the CPU multiplies natively (its flags faked
here both ways), quantized modes keep float32 activations, a flag always wins."""

import logging

import pytest
import torch

from shards import dtypes
from shards.dtypes import DtypeError, resolve_dtype

CPU = torch.device("cpu")


@pytest.fixture
def bf16_cpu(monkeypatch):
    def fake(has: bool) -> None:
        monkeypatch.setattr(dtypes, "cpu_has_bf16_dot", lambda: has)

    return fake


@pytest.mark.parametrize(("has_bf16", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_default_follows_bf16_dot_products(bf16_cpu, caplog, has_bf16, expected):
    bf16_cpu(has_bf16)
    with caplog.at_level(logging.INFO, logger="shardserve.worker"):
        assert resolve_dtype(None, CPU, "bfloat16") == expected
    line = next(r.getMessage() for r in caplog.records if "default on CPU" in r.getMessage())
    assert line.startswith(f"dtype {str(expected).removeprefix('torch.')} ")
    assert ("has bfloat16 dot products" in line) == has_bf16
    assert "--dtype overrides" in line


@pytest.mark.parametrize("mode", ["ifq", "ifq_nf4", "smoothquant", "fp8"])
def test_quantized_modes_default_to_float32_activations(bf16_cpu, mode):
    bf16_cpu(True)
    assert resolve_dtype(None, CPU, None, mode) == torch.float32


@pytest.mark.parametrize("has_bf16", [True, False])
def test_explicit_dtype_wins(bf16_cpu, caplog, has_bf16):
    bf16_cpu(has_bf16)
    with caplog.at_level(logging.WARNING, logger="shardserve.worker"):
        assert resolve_dtype("float32", CPU, None) == torch.float32
        assert resolve_dtype("bfloat16", CPU, None, "ifq") == torch.bfloat16
        assert resolve_dtype("auto", CPU, "bfloat16") == torch.bfloat16
        assert resolve_dtype("auto", CPU, None) == torch.float32
    slow = [r for r in caplog.records if "multiplies it slowly" in r.getMessage()]
    assert len(slow) == (0 if has_bf16 else 2)  # emulated bfloat16 is said to be slow


def test_gpu_default_is_float16():
    assert resolve_dtype(None, torch.device("cuda"), "bfloat16") == torch.float16
    assert resolve_dtype("auto", torch.device("cuda"), "float32") == torch.float16


def test_unknown_dtype_is_refused():
    with pytest.raises(DtypeError, match="int4"):
        resolve_dtype("int4", CPU, None)


def test_worker_serves_in_the_default_dtype(bf16_cpu, tmp_path):
    from tests.support.tiny import build_hf_model, make_worker, save_checkpoint, tiny_config

    folder = save_checkpoint(build_hf_model(tiny_config("llama")), tmp_path / "m")
    bf16_cpu(True)
    worker = make_worker(folder, dtype=None)
    assert worker.dtype == torch.bfloat16
    assert all(k.dtype == torch.bfloat16 for pair in worker.runner.kv_caches for k in pair)
    assert worker.info().dtype == "bfloat16"
    bf16_cpu(False)
    assert make_worker(folder, dtype=None).dtype == torch.float32
