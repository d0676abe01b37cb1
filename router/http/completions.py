"""The two generation endpoints: request → prompt ids + GenerationParams → the OpenAI shapes,
streamed as server-sent events or answered as one JSON body."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from router.engine.outputs import EngineDeadError, Overloaded, RequestOutput
from router.http.context import ServingContext
from router.http.protocol import APIError, ChatCompletionRequest, CompletionRequest, _Sampling
from router.http.responses import (
    add_usage,
    chat_logprobs,
    completion_logprobs,
    json_response,
    sse,
    usage,
)
from router.http.templates import NoChatFormat, TemplateError
from router.params import GenerationParams
from shards.wire import SamplingParams

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _params(
    ctx: ServingContext,
    req: _Sampling,
    prompt_len: int,
    logprobs: int | None,
    score_prompt: bool = False,
) -> GenerationParams:
    param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    if prompt_len >= ctx.max_model_len:
        raise APIError(
            400,
            f"the prompt is {prompt_len} tokens; this model's context is {ctx.max_model_len} "
            "tokens, which leaves no room to generate",
            param=param,
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
    # Omitted, or more than the prompt leaves: the rest of the context (the vendor's behaviour).
    room = ctx.max_model_len - prompt_len
    max_tokens = room if req.max_tokens is None else min(req.max_tokens, room)
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
        prompt_logprobs=(logprobs or 0) if score_prompt else None,
    )
    return GenerationParams(
        max_tokens=max_tokens,
        sampling=sampling,
        stop_token_ids=() if req.ignore_eos else ctx.template.stop_token_ids,
        stop=req.stop_strings(),
        ignore_eos=req.ignore_eos,
    )


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


def _stream(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=_SSE_HEADERS)


# -- /v1/chat/completions ---------------------------------------------------------------------


async def chat_completions(
    ctx: ServingContext, request: Request, req: ChatCompletionRequest
) -> Response:
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in req.messages
    ]
    try:
        prompt_ids = ctx.template.render(messages)
    except NoChatFormat as e:
        raise APIError(400, str(e), param="messages", code="no_chat_template") from e
    except TemplateError as e:
        raise APIError(400, str(e), param="messages", code="invalid_messages") from e
    if not prompt_ids:
        raise APIError(400, "the messages render to an empty prompt", param="messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = _params(ctx, req, len(prompt_ids), logprobs)
    ctx.engine.admit(len(prompt_ids))  # before a stream starts: a refusal is still a 429
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    gen = ctx.engine.generate(request_id, prompt_ids, params)
    base = {"id": request_id, "created": int(time.time()), "model": ctx.model_name}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _stream(_chat_stream(ctx, gen, base, include_usage, req.logprobs))
    outs = await _collect(request, gen)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "".join(o.text for o in outs)},
        "logprobs": {"content": chat_logprobs(ctx.tokenizer, outs)} if req.logprobs else None,
        "finish_reason": outs[-1].finish_reason,
    }
    body = {**base, "object": "chat.completion", "choices": [choice], "usage": usage(outs[-1])}
    return json_response(body)


async def _chat_stream(ctx, gen, base, include_usage: bool, logprobs: bool) -> AsyncIterator[bytes]:
    chunk = {**base, "object": "chat.completion.chunk"}

    def choice(delta: dict, finish: str | None = None, lp=None) -> dict:
        return {
            **chunk,
            "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}],
        }

    yield sse(choice({"role": "assistant", "content": ""}))
    try:
        async for out in gen:
            if out.text or (logprobs and out.token_ids):
                lp = {"content": chat_logprobs(ctx.tokenizer, [out])} if logprobs else None
                yield sse(choice({"content": out.text}, lp=lp))
            if out.finished:
                yield sse(choice({}, out.finish_reason))
                if include_usage:
                    yield sse({**chunk, "choices": [], "usage": usage(out)})
    except EngineDeadError as e:
        yield sse(APIError(500, str(e)).body())
    except Overloaded as e:  # its deadline passed before its first step
        yield sse(APIError(429, str(e), code=e.reason).body())
    yield sse("[DONE]")


# -- /v1/completions --------------------------------------------------------------------------


async def completions(ctx: ServingContext, request: Request, req: CompletionRequest) -> Response:
    vocab = len(ctx.tokenizer)
    prompts = []
    for p in req.prompts():
        ids = ctx.tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not isinstance(p, str) and max(ids) >= vocab:
            raise APIError(
                400,
                f"prompt token id {max(ids)} is outside the vocabulary ({vocab})",
                param="prompt",
            )
        prompts.append(ids)
    # Echo with logprobs scores the prompt; so does max_tokens=0 (only allowed with echo).
    scoring = req.echo and (req.logprobs is not None or req.max_tokens == 0)
    params = [_params(ctx, req, len(ids), req.logprobs, scoring) for ids in prompts]
    ctx.engine.admit(sum(len(ids) for ids in prompts))
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
        echo_ids = prompts[0] if req.echo else None
        return _stream(_completion_stream(ctx, gens[0], base, echo_ids, include_usage, req))
    results = await asyncio.gather(*(_collect(request, g) for g in gens))
    choices = []
    total: dict = {}
    for i, (ids, outs) in enumerate(zip(prompts, results)):
        text = "".join(o.text for o in outs)
        if req.echo:
            text = ctx.tokenizer.decode(ids) + text
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs(ctx.tokenizer, outs, ids if req.echo else None)
        choices.append(
            {
                "index": i,
                "text": text,
                "finish_reason": outs[-1].finish_reason,
                "logprobs": logprobs,
            }
        )
        add_usage(total, usage(outs[-1]))
    return json_response({**base, "object": "text_completion", "choices": choices, "usage": total})


async def _completion_stream(
    ctx, gen, base, echo_ids: list[int] | None, include_usage: bool, req: CompletionRequest
) -> AsyncIterator[bytes]:
    chunk = {**base, "object": "text_completion"}
    want_lp = req.logprobs is not None

    def choice(text: str, lp=None, finish: str | None = None) -> dict:
        return {
            **chunk,
            "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}],
        }

    first = True
    try:
        async for out in gen:
            if first and echo_ids is not None:
                # The echo goes out with the first output, which carries the prompt's scores.
                lp = None
                if want_lp:
                    scored = RequestOutput(
                        "",
                        [],
                        prompt_logprobs=out.prompt_logprobs,
                        prompt_top_logprobs=out.prompt_top_logprobs,
                    )
                    lp = completion_logprobs(ctx.tokenizer, [scored], echo_ids)
                yield sse(choice(ctx.tokenizer.decode(echo_ids), lp))
            first = False
            if out.text or (want_lp and out.token_ids):
                lp = completion_logprobs(ctx.tokenizer, [out]) if want_lp else None
                yield sse(choice(out.text, lp))
            if out.finished:
                yield sse(choice("", finish=out.finish_reason))
                if include_usage:
                    yield sse({**chunk, "choices": [], "usage": usage(out)})
    except EngineDeadError as e:
        yield sse(APIError(500, str(e)).body())
    except Overloaded as e:  # its deadline passed before its first step
        yield sse(APIError(429, str(e), code=e.reason).body())
    yield sse("[DONE]")
