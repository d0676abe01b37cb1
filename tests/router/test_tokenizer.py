"""Loading a checkpoint's tokenizer: its own tokenizer class only with --trust-remote-code."""

from __future__ import annotations

import json
import shutil

import pytest

from launcher.embedded import ensure_embedded_model
from router.http.tokenizer import TokenizerError, load_tokenizer


@pytest.fixture
def custom_tokenizer_folder(tmp_path):
    """A Baichuan-style folder: tokenizer_config.json names a class in a file it ships."""
    shutil.copy(ensure_embedded_model() / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "baichuan"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BaichuanTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
    }))  # fmt: skip
    (tmp_path / "tokenization_baichuan.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class BaichuanTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    return tmp_path


def test_a_custom_tokenizer_class_needs_the_flag_and_says_so(custom_tokenizer_folder):
    with pytest.raises(TokenizerError, match=r"pass --trust-remote-code \(TRUST_REMOTE_CODE=1\)"):
        load_tokenizer(str(custom_tokenizer_folder))


def test_with_the_flag_the_checkpoints_own_class_loads(custom_tokenizer_folder):
    tok = load_tokenizer(str(custom_tokenizer_folder), trust_remote_code=True)
    assert type(tok).__name__ == "BaichuanTokenizer"
    assert tok.encode("hello world")  # and it tokenizes


def test_a_folder_without_tokenizer_files_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        load_tokenizer(str(tmp_path))
