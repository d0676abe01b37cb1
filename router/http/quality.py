"""Perplexity of a model (as served: dtype, quantization, TP) on a fixed held-out text, so a
quantization mode's quality is a number next to `none`'s.

The default text is the docstrings of a fixed list of standard-library modules: plain English
prose that ships with every Python, needs no download, and is not what the model is tuned on.
"""

from __future__ import annotations

import importlib
import inspect
import math

EVAL_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "decimal",
    "email", "enum", "functools", "heapq", "http", "itertools", "json", "logging", "pathlib",
    "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess",
    "tarfile", "textwrap", "threading", "typing", "unittest", "urllib", "uuid", "zipfile",
)  # fmt: skip


def eval_text() -> str:
    parts = []
    for name in EVAL_MODULES:
        doc = inspect.getdoc(importlib.import_module(name))
        if doc:
            parts.append(doc)
    return "\n\n".join(parts)


def eval_tokens(tokenizer, max_tokens: int = 2048) -> list[int]:
    return tokenizer.encode(eval_text())[:max_tokens]


def perplexity(llm, token_ids: list[int], window: int = 1024) -> float:
    """exp(mean negative log-likelihood) of every token after the first of each window, scored
    through the engine's prompt logprobs (the path `echo` + `logprobs` serves)."""
    from router.params import GenerationParams
    from shards.wire import SamplingParams

    score = GenerationParams(
        max_tokens=1, sampling=SamplingParams(temperature=0.0, prompt_logprobs=0)
    )
    windows = [token_ids[i : i + window] for i in range(0, len(token_ids), window)]
    windows = [w for w in windows if len(w) > 1]
    done = llm.generate(windows, [score] * len(windows))
    logprobs = [lp for c in done for lp in c.prompt_logprobs]
    return math.exp(-sum(logprobs) / len(logprobs))
