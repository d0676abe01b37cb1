"""Load the model's tokenizer through transformers (never the checkpoint's model code)."""

from __future__ import annotations


class TokenizerError(ValueError):
    pass


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise TokenizerError(
                f"{model_path}: the tokenizer is a custom class shipped with the checkpoint; "
                "pass --trust-remote-code (TRUST_REMOTE_CODE=1) to load it"
            ) from e
        raise TokenizerError(f"{model_path}: cannot load the tokenizer ({e})") from e
    except OSError as e:
        raise TokenizerError(f"{model_path}: no usable tokenizer files ({e})") from e
