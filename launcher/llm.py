"""The offline Python API: the same scheduler and shard as the server, driven in-process.

llm = LLM()                      # the embedded default model
out = llm.generate(["Hello"], GenerationParams(max_tokens=32))
"""

from __future__ import annotations

import gc
import itertools
import os
import time
from dataclasses import dataclass, field

from launcher import plan
from launcher.config import Config
from launcher.plan import config_with
from router.assembly import build_scheduler, build_template
from router.engine.core import EngineCore
from router.http.tokenizer import load_tokenizer as load_tokenizer_of
from router.lookahead.ngrams import TokenKeys
from router.params import GenerationParams

GiB = 2**30


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list | None = None
    num_cached_prompt_tokens: int = 0
    prompt_logprobs: list[float] | None = None  # for prompt tokens 1.., when asked
    # time.perf_counter() when the first and the last token arrived (a decode-phase rate is
    # (len(token_ids) - 1) / (last_token_at - first_token_at))
    first_token_at: float | None = None
    last_token_at: float | None = None


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        config: Config | None = None,
        dtype: str | None = None,
        max_model_len: int | None = None,
        max_num_batched_tokens: int | None = None,
        max_num_seqs: int | None = None,
        block_size: int | None = None,
        kv_cache_memory: int | None = None,
        enable_prefix_caching: bool | None = None,
        seed: int | None = None,
        quantization: str | None = None,
        use_lookahead: bool | None = None,
        num_speculative_tokens: int | None = None,
        enforce_eager: bool | None = None,
        gpu_memory_utilization: float | None = None,
        cpu_compile: bool | None = None,
        shard_process: bool = False,
        load_tokenizer: bool = True,
        progress: bool = False,
        num_threads: int | None = None,
        tensor_parallel_size: int = 1,
        fast_kernels: bool = True,
        device: str = "cpu",
        cpu_kernels: bool = True,
    ) -> None:
        """The settings a server takes are `config`'s (default: `Config()`, the server's own
        defaults), each keyword from `dtype` to `cpu_compile` overriding its field when given;
        the shard and the scheduler are derived from them as the server derives its own
        (launcher/plan.py). cpu_compile: on CPU, compile decode steps at start-up (about a
        minute the first time on two cores, seconds once torch's compile cache holds them).
        cpu_kernels=False: torch's own int8 paths instead of the hand-written GEMV
        (shards/kernels.py)."""
        c = config_with(
            config,
            dtype=dtype,
            max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            block_size=block_size,
            kv_cache_memory=kv_cache_memory,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            quantization=quantization,
            use_lookahead=use_lookahead,
            num_speculative_tokens=num_speculative_tokens,
            enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
            cpu_compile=cpu_compile,
        )
        self.config = c
        if model is None:
            from launcher.embedded import ensure_embedded_model

            model = str(ensure_embedded_model())
        self.model_path = model
        quantization = c.quantization
        if quantization == "auto":
            from launcher.serve import resolve_quantization

            quantization = resolve_quantization(quantization, model, "cpu")
        from shards.model_config import load_model_config

        cfg = load_model_config(model)
        max_len = plan.max_model_len(c, cfg)
        spec = plan.shard_spec(
            c,
            model,
            quantization,
            max_len,
            device=device,
            num_threads=num_threads,
            world_size=tensor_parallel_size,
            progress=progress,
            fast_kernels=fast_kernels,
            cpu_kernels=cpu_kernels,
        )
        if shard_process or tensor_parallel_size > 1:  # ranks are always processes
            from launcher.shard_process import ShardProcess

            self.shard = ShardProcess(spec)
            info = self.shard.info()
            self.worker = None
        else:
            from shards.worker import Worker

            self.worker = self.shard = Worker(spec)
            info = self.worker.info()
        self.info = info
        self.tokenizer = None
        if load_tokenizer:
            self.tokenizer = load_tokenizer_of(model, c.trust_remote_code)
        keys = None
        if c.use_lookahead and self.tokenizer is not None:
            keys = TokenKeys.from_tokenizer(self.tokenizer)
        name = os.path.basename(os.path.normpath(model))
        settings = plan.router_settings(c, model, name, (), quantization, info.max_model_len)
        self.scheduler = build_scheduler(settings, info, keys)
        self.template = None  # as the server chooses it: CONV_TEMPLATE, tokenizer, family
        if self.tokenizer is not None:
            self.template = build_template(settings, self.tokenizer, info.eos_token_ids)
        self.engine = EngineCore(self.scheduler, self.shard)
        self._request_ids = itertools.count()

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The prompt ids of a chat, rendered as the server renders it."""
        return self.template.render(messages)

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: GenerationParams | list[GenerationParams] | None = None,
    ) -> list[Completion]:
        """Run every prompt to completion, batched by the scheduler; results in prompt order."""
        params_list = (
            params if isinstance(params, list) else [params or GenerationParams()] * len(prompts)
        )
        completions: dict[int, Completion] = {}
        order = []
        for prompt, p in zip(prompts, params_list):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"offline-{next(self._request_ids)}"
            seq = self.engine.add(rid, ids, p)
            completions[seq.seq_id] = Completion(rid, ids)
            order.append(seq.seq_id)
        while self.engine.has_work():
            for u in self.engine.step():
                c = completions[u.seq.seq_id]
                if u.new_token_ids:
                    c.last_token_at = time.perf_counter()
                    if c.first_token_at is None:
                        c.first_token_at = c.last_token_at
                c.token_ids += u.new_token_ids
                if u.logprobs is not None:
                    c.logprobs = (c.logprobs or []) + u.logprobs
                if u.top_logprobs is not None:
                    c.top_logprobs = (c.top_logprobs or []) + u.top_logprobs
                if u.finished:
                    c.finish_reason = u.seq.finish_reason
                    c.num_cached_prompt_tokens = u.seq.num_cached_prompt_tokens
                    if u.seq.params.sampling.prompt_logprobs is not None:
                        c.prompt_logprobs = list(u.seq.prompt_logprobs)
        out = [completions[i] for i in order]
        if self.tokenizer is not None:
            for c in out:
                c.text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        return out

    def close(self) -> None:
        if hasattr(self.shard, "close"):
            self.shard.close()
        if self.worker is not None:
            # An in-process shard's weights and KV cache go now, not when the last reference
            # does: the next LLM on the same GPU sizes its cache from what is free.
            import torch

            self.worker = self.shard = self.engine = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
