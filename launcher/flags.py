"""How a `Config` field becomes a flag: its flags, env var, default, parser and help (`opt`),
and the parsers of flag values. `launcher/config.py` declares the fields."""

from __future__ import annotations

import re
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A bad flag or environment value; the message names the flag."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected one of 0, 1, true, false; got {text!r}")


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"expected a size such as 2GiB, 512MiB or a byte count; got {text!r}")
    number, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit[0]]
    return int(number * scale)


def parse_optional_int(text: str) -> int | None:
    return None if str(text).strip().lower() in ("", "none") else int(text)


def opt(
    flags: list[str] | str | None,
    env: str | None,
    default: Any,
    help: str,
    parse=str,
    choices: list[str] | None = None,
    is_flag: bool = False,
    file_key: str | None = None,
):
    """A Config field: its flags, env var, default, parser and help."""
    flags = [flags] if isinstance(flags, str) else (flags or [])
    meta = dict(
        flags=flags,
        env=env,
        help=help,
        parse=parse,
        choices=choices,
        is_flag=is_flag,
        file_key=file_key,
    )
    return field(default=default, metadata=meta)
