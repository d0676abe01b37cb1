"""`shardserve bench`: a load generator for any OpenAI-compatible server. Streams chat
completions at a fixed concurrency and reports TTFT, inter-token and end-to-end latency
percentiles and throughput. Speaks HTTP only (httpx); the server may be anyone's."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass

import httpx

from clients.report import Progress, RequestResult, config_dict, format_report, summarize
from clients.sse import DONE, base_url, delta_text, error_message, event_error, parse_sse_line
from clients.workload import build_prompts

MAX_ERRORS_SHOWN = 5


@dataclass(frozen=True)
class BenchConfig:
    url: str = "http://127.0.0.1:8501"
    model: str | None = None  # None: the first id of /v1/models, else "model"
    concurrency: int = 8
    requests: int = 64
    max_tokens: int = 128
    prompt_tokens: int = 256
    rag_document_tokens: int = 0  # > 0: long-document RAG prompts instead of prompt_tokens
    ignore_eos: bool = True
    temperature: float = 0.0
    api_key: str | None = None
    timeout: float = 600.0  # seconds per request, end to end
    seed: int = 0
    json_path: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("concurrency", "requests", "max_tokens", "prompt_tokens"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be at least 1, got {getattr(self, name)}")
        if self.rag_document_tokens < 0:
            raise ValueError(f"--rag-document-tokens must be >= 0, got {self.rag_document_tokens}")
        if self.timeout <= 0:
            raise ValueError(f"--timeout must be positive, got {self.timeout}")
        base_url(self.url, "--url")

    @property
    def base_url(self) -> str:
        return base_url(self.url, "--url")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


async def _discover_model(client: httpx.AsyncClient, config: BenchConfig) -> str:
    if config.model:
        return config.model
    try:
        r = await client.get(
            f"{config.base_url}/v1/models",
            headers=config.headers(),
            timeout=min(10, config.timeout),
        )
        data = r.json().get("data") if r.status_code == 200 else None
        if isinstance(data, list) and data and isinstance(data[0].get("id"), str):
            return data[0]["id"]
    except (httpx.HTTPError, ValueError, AttributeError):
        pass
    return "model"  # what the vendor's examples send; servers serving one model accept it


def _body(config: BenchConfig, model: str, prompt: str) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        # A vLLM extension: exact output lengths make runs comparable; plain OpenAI rejects it.
        body["ignore_eos"] = True
    return body


async def _stream_one(client: httpx.AsyncClient, config: BenchConfig, body: dict) -> RequestResult:
    res = RequestResult(ok=False)
    start = time.perf_counter()
    last: float | None = None
    num_chunks = 0
    done = False
    finished = False  # some servers end the stream after the finish_reason without [DONE]
    url = f"{config.base_url}/v1/chat/completions"
    async with client.stream("POST", url, json=body, headers=config.headers()) as r:
        if r.status_code != 200:
            res.error = error_message(r.status_code, await r.aread())
            return res
        async for line in r.aiter_lines():
            event = parse_sse_line(line)
            if event == DONE:
                done = True
                break
            if not isinstance(event, dict):
                continue
            if (err := event_error(event)) is not None:
                res.error = f"error event mid-stream: {err}"
                return res
            now = time.perf_counter()
            choices = event.get("choices") or []
            if choices and isinstance(choices[0], dict) and choices[0].get("finish_reason"):
                finished = True
            if delta_text(event):
                num_chunks += 1
                if last is None:
                    res.ttft = now - start
                else:
                    res.itls.append(now - last)
                last = now
            usage = event.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                res.output_tokens = usage["completion_tokens"]
                res.prompt_tokens = usage.get("prompt_tokens")
                res.usage_reported = True
    res.e2e = time.perf_counter() - start
    if not (done or finished):
        res.error = "the stream ended before [DONE]"
        return res
    if not res.usage_reported:
        # Without usage a chunk stands in for a token; a chunk may carry several: an undercount.
        res.output_tokens = num_chunks
    res.ok = True
    return res


async def _one_request(client: httpx.AsyncClient, config: BenchConfig, body: dict) -> RequestResult:
    try:
        return await asyncio.wait_for(_stream_one(client, config, body), config.timeout)
    except asyncio.TimeoutError:
        return RequestResult(ok=False, error=f"timed out after {config.timeout:g} s")
    except httpx.HTTPError as e:
        return RequestResult(ok=False, error=f"{type(e).__name__}: {str(e) or 'no detail'}")


async def run_bench(config: BenchConfig | dict) -> dict:
    """Runs the load and returns the report as a JSON-ready dict (also written to json_path)."""
    if isinstance(config, dict):
        config = BenchConfig(**config)
    prompts = build_prompts(
        config.requests, config.prompt_tokens, config.rag_document_tokens, config.seed
    )
    limits = httpx.Limits(
        max_connections=config.concurrency, max_keepalive_connections=config.concurrency
    )
    results: list[RequestResult | None] = [None] * config.requests
    errors: list[str] = []
    progress = Progress(config.requests, config.progress)
    async with httpx.AsyncClient(timeout=config.timeout, limits=limits) as client:
        model = await _discover_model(client, config)
        pending = iter(range(config.requests))

        async def worker() -> None:
            # Workers share one iterator: asyncio never switches inside next().
            for idx in pending:
                res = await _one_request(client, config, _body(config, model, prompts[idx]))
                results[idx] = res
                if res.error is not None:
                    errors.append(res.error)
                progress.update(res.ok)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(config.concurrency, config.requests))))
        wall = time.perf_counter() - start
    done = [r for r in results if r is not None]
    report = summarize(config_dict(config), model, done, errors[:MAX_ERRORS_SHOWN], wall)
    if config.json_path:
        with open(config.json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report


def parse_config(argv: list[str] | None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        prog="shardserve bench",
        description="Load an OpenAI-compatible server with streamed chat completions and "
        "report latency percentiles and throughput. Exit status 1 when any request failed.",
    )
    p.add_argument("--url", default=d.url, help="server base URL (with or without /v1)")
    p.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight")
    p.add_argument("--requests", type=int, default=d.requests, help="requests in total")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="output tokens each")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="approximate")
    p.add_argument(
        "--rag-document-tokens",
        type=int,
        default=d.rag_document_tokens,
        help="> 0: a document of about this many tokens and a question quoting it",
    )
    p.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let replies end at EOS (lengths then vary; needed for servers without ignore_eos)",
    )
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    p.add_argument("--timeout", type=float, default=d.timeout, help="seconds per request")
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of the synthetic prompts; change it between runs on one server, or the "
        "second run finds its prompts in the prefix cache",
    )
    p.add_argument("--json", dest="json_path", default=None, help="write the report here")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    try:
        return BenchConfig(**vars(args))
    except ValueError as e:
        p.error(str(e))
        raise  # p.error exits; this keeps the type checker honest


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 when every request succeeded, 1 when any failed, 2 for bad flags."""
    config = parse_config(argv)
    # The launcher logs at INFO, and httpx would log one line per request.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    report = asyncio.run(run_bench(config))
    print(format_report(report))
    return 0 if report["requests"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
