"""The two generation endpoints: request → prompt ids + GenerationParams → the OpenAI shapes,
streamed as server-sent events or answered as one JSON body."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from router.engine import AsyncEngine, EngineDeadError, RequestOutput
from router.params import GenerationParams
from router.protocol import APIError, ChatCompletionRequest, CompletionRequest, _Sampling
from router.templates import ChatTemplate
from shards.wire import SamplingParams


@dataclass
class ServingContext:
    engine: AsyncEngine
    tokenizer: object
    template: ChatTemplate
    model_name: str
    max_model_len: int


def json_response(body: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _sse(body: dict | str) -> bytes:
    payload = body if isinstance(body, str) else orjson.dumps(body).decode()
    return f"data: {payload}\n\n".encode()


def _params(
    ctx: ServingContext, req: _Sampling, prompt_len: int, logprobs: int | None
) -> GenerationParams:
    if prompt_len >= ctx.max_model_len:
        raise APIError(
            400,
            f"the prompt is {prompt_len} tokens; this model's context is {ctx.max_model_len} "
            "tokens, which leaves no room to generate",
            param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    if req.max_tokens is not None and req.max_tokens > ctx.max_model_len:
        raise APIError(
            400,
            f"max_tokens={req.max_tokens} exceeds this model's context of "
            f"{ctx.max_model_len} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    room = ctx.max_model_len - prompt_len
    max_tokens = min(req.max_tokens or room, room)
    sampling = SamplingParams(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        logprobs=logprobs,
    )
    return GenerationParams(
        max_tokens=max_tokens,
        sampling=sampling,
        stop_token_ids=() if req.ignore_eos else ctx.template.stop_token_ids,
        stop=req.stop_strings(),
        ignore_eos=req.ignore_eos,
    )


def _usage(out: RequestOutput) -> dict:
    return {
        "prompt_tokens": out.num_prompt_tokens,
        "completion_tokens": out.num_output_tokens,
        "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
        "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens},
    }


async def _watch_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(request: Request, gen: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    """Drain a generation for a non-streaming answer; a disconnect aborts it."""
    outputs: list[RequestOutput] = []

    async def drain() -> None:
        async for out in gen:
            outputs.append(out)

    work = asyncio.ensure_future(drain())
    watch = asyncio.ensure_future(_watch_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work not in done:
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        await gen.aclose()
        raise asyncio.CancelledError
    work.result()
    return outputs


def _token_logprobs(ctx: ServingContext, outs: list[RequestOutput]) -> list[dict]:
    tok = ctx.tokenizer
    content = []
    for out in outs:
        for i, token in enumerate(out.token_ids):
            text = tok.decode([token])
            entry = {"token": text, "logprob": out.logprobs[i], "bytes": list(text.encode())}
            top = out.top_logprobs[i] if out.top_logprobs else []
            entry["top_logprobs"] = [
                {"token": tok.decode([t]), "logprob": lp, "bytes": list(tok.decode([t]).encode())}
                for t, lp in (top or [])
            ]
            content.append(entry)
    return content


async def chat_completions(
    ctx: ServingContext, request: Request, req: ChatCompletionRequest
) -> Response:
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in req.messages
    ]
    prompt_ids = ctx.template.render(messages)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = _params(ctx, req, len(prompt_ids), logprobs)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    gen = ctx.engine.generate(request_id, prompt_ids, params)
    base = {"id": request_id, "created": created, "model": ctx.model_name}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _chat_stream(ctx, gen, base, include_usage, req.logprobs),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    outs = await _collect(request, gen)
    last = outs[-1]
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "".join(o.text for o in outs)},
        "logprobs": {"content": _token_logprobs(ctx, outs)} if req.logprobs else None,
        "finish_reason": last.finish_reason,
    }
    return json_response(
        {**base, "object": "chat.completion", "choices": [choice], "usage": _usage(last)}
    )


async def _chat_stream(ctx, gen, base, include_usage: bool, logprobs: bool) -> AsyncIterator[bytes]:
    chunk = {**base, "object": "chat.completion.chunk"}
    yield _sse(
        {
            **chunk,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
    )
    try:
        async for out in gen:
            if out.text or (logprobs and out.token_ids):
                choice = {
                    "index": 0,
                    "delta": {"content": out.text},
                    "finish_reason": None,
                    "logprobs": {"content": _token_logprobs(ctx, [out])} if logprobs else None,
                }
                yield _sse({**chunk, "choices": [choice]})
            if out.finished:
                yield _sse(
                    {
                        **chunk,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {},
                                "logprobs": None,
                                "finish_reason": out.finish_reason,
                            }
                        ],
                    }
                )
                if include_usage:
                    yield _sse({**chunk, "choices": [], "usage": _usage(out)})
    except EngineDeadError as e:
        yield _sse(APIError(500, str(e)).body())
    yield _sse("[DONE]")


async def completions(ctx: ServingContext, request: Request, req: CompletionRequest) -> Response:
    prompts = []
    for p in req.prompts():
        ids = ctx.tokenizer.encode(p) if isinstance(p, str) else list(p)
        vocab = len(ctx.tokenizer)
        if not isinstance(p, str) and max(ids) >= vocab:
            raise APIError(
                400,
                f"prompt token id {max(ids)} is outside the vocabulary ({vocab})",
                param="prompt",
            )
        prompts.append(ids)
    if req.echo and req.logprobs is not None:
        raise APIError(
            400,
            "echo with logprobs (prompt scoring) is not supported yet",
            param="echo",
            code="unsupported",
        )
    params = [_params(ctx, req, len(ids), req.logprobs) for ids in prompts]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    base = {"id": request_id, "created": int(time.time()), "model": ctx.model_name}
    gens = [
        ctx.engine.generate(f"{request_id}-{i}", ids, p)
        for i, (ids, p) in enumerate(zip(prompts, params))
    ]
    if req.stream:
        if len(gens) != 1:
            raise APIError(400, "streaming supports one prompt per request", param="prompt")
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        echo = ctx.tokenizer.decode(prompts[0]) if req.echo else ""
        return StreamingResponse(
            _completion_stream(ctx, gens[0], base, echo, include_usage, req.logprobs),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    results = await asyncio.gather(*(_collect(request, g) for g in gens))
    choices = []
    usage = {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    for i, (ids, outs) in enumerate(zip(prompts, results)):
        text = "".join(o.text for o in outs)
        if req.echo:
            text = ctx.tokenizer.decode(ids) + text
        choices.append(
            {
                "index": i,
                "text": text,
                "finish_reason": outs[-1].finish_reason,
                "logprobs": _legacy_logprobs(ctx, outs) if req.logprobs is not None else None,
            }
        )
        u = _usage(outs[-1])
        for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
            usage[k] += u[k]
        usage["prompt_tokens_details"]["cached_tokens"] += u["prompt_tokens_details"][
            "cached_tokens"
        ]
    return json_response({**base, "object": "text_completion", "choices": choices, "usage": usage})


def _legacy_logprobs(ctx: ServingContext, outs: list[RequestOutput]) -> dict:
    tok = ctx.tokenizer
    tokens, lps, tops = [], [], []
    for out in outs:
        for i, t in enumerate(out.token_ids):
            tokens.append(tok.decode([t]))
            lps.append(out.logprobs[i])
            top = out.top_logprobs[i] if out.top_logprobs else None
            tops.append({tok.decode([tt]): lp for tt, lp in top} if top else None)
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def _completion_stream(
    ctx, gen, base, echo: str, include_usage: bool, logprobs
) -> AsyncIterator[bytes]:
    chunk = {**base, "object": "text_completion"}
    if echo:
        yield _sse(
            {
                **chunk,
                "choices": [{"index": 0, "text": echo, "logprobs": None, "finish_reason": None}],
            }
        )
    try:
        async for out in gen:
            if out.text or (logprobs is not None and out.token_ids):
                yield _sse(
                    {
                        **chunk,
                        "choices": [
                            {
                                "index": 0,
                                "text": out.text,
                                "finish_reason": None,
                                "logprobs": _legacy_logprobs(ctx, [out])
                                if logprobs is not None
                                else None,
                            }
                        ],
                    }
                )
            if out.finished:
                yield _sse(
                    {
                        **chunk,
                        "choices": [
                            {
                                "index": 0,
                                "text": "",
                                "logprobs": None,
                                "finish_reason": out.finish_reason,
                            }
                        ],
                    }
                )
                if include_usage:
                    yield _sse({**chunk, "choices": [], "usage": _usage(out)})
    except EngineDeadError as e:
        yield _sse(APIError(500, str(e)).body())
    yield _sse("[DONE]")
