"""What every endpoint serves from: the engines, the tokenizer and chat template, the model's name
and context length (built once at start-up by router/http/server.py: build_context)."""

from __future__ import annotations

from dataclasses import dataclass

from router.engine.pool import EnginePool
from router.http.templates import ChatTemplate


@dataclass
class ServingContext:
    engine: EnginePool
    tokenizer: object
    template: ChatTemplate
    model_name: str
    max_model_len: int
