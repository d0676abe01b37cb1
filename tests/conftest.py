"""Fixtures shared across unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smol():
    """The embedded model's tokenizer (SmolLM2: byte-level BPE, chatml template)."""
    from transformers import AutoTokenizer

    from launcher.embedded import ensure_embedded_model

    return AutoTokenizer.from_pretrained(ensure_embedded_model())
