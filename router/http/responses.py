"""The OpenAI response pieces shared by both endpoints: usage, logprobs, SSE framing."""

from __future__ import annotations

import orjson
from starlette.responses import Response

from router.engine.outputs import RequestOutput


def json_response(body: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def sse(body: dict | str) -> bytes:
    payload = body if isinstance(body, str) else orjson.dumps(body).decode()
    return f"data: {payload}\n\n".encode()


def usage(out: RequestOutput) -> dict:
    body = {
        "prompt_tokens": out.num_prompt_tokens,
        "completion_tokens": out.num_output_tokens,
        "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
        "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens},
    }
    if out.num_draft_proposed:
        # OpenAI's names for predicted-output tokens, here the lookahead drafts
        body["completion_tokens_details"] = {
            "accepted_prediction_tokens": out.num_draft_accepted,
            "rejected_prediction_tokens": out.num_draft_proposed - out.num_draft_accepted,
        }
    return body


def add_usage(total: dict, part: dict) -> dict:
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        total[key] = total.get(key, 0) + part[key]
    details = total.setdefault("prompt_tokens_details", {"cached_tokens": 0})
    details["cached_tokens"] += part["prompt_tokens_details"]["cached_tokens"]
    if "completion_tokens_details" in part:
        drafts = total.setdefault("completion_tokens_details", {})
        for key, n in part["completion_tokens_details"].items():
            drafts[key] = drafts.get(key, 0) + n
    return total


def chat_logprobs(tokenizer, outs: list[RequestOutput]) -> list[dict]:
    """`choices[].logprobs.content` of the chat API: one entry per generated token."""

    def entry(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for out in outs:
        for i, token in enumerate(out.token_ids):
            item = entry(token, out.logprobs[i])
            top = out.top_logprobs[i] if out.top_logprobs else None
            item["top_logprobs"] = [entry(t, lp) for t, lp in top or []]
            content.append(item)
    return content


def completion_logprobs(
    tokenizer, outs: list[RequestOutput], prompt_ids: list[int] | None = None
) -> dict:
    """The completions API's logprobs. With `prompt_ids` (echo) the prompt's tokens come first,
    the very first without a logprob: nothing precedes it."""
    ids: list[int] = []
    lps: list[float | None] = []
    tops: list[dict | None] = []

    def top_dict(pairs) -> dict | None:
        return {tokenizer.decode([t]): lp for t, lp in pairs} if pairs else None

    if prompt_ids is not None:
        scored = outs[0].prompt_logprobs or []
        scored_top = outs[0].prompt_top_logprobs or []
        ids += prompt_ids
        lps += [None, *scored]
        tops += [None, *(top_dict(p) for p in scored_top)]
        tops += [None] * (len(ids) - len(tops))
    for out in outs:
        for i, token in enumerate(out.token_ids):
            ids.append(token)
            lps.append(out.logprobs[i])
            tops.append(top_dict(out.top_logprobs[i]) if out.top_logprobs else None)
    tokens = [tokenizer.decode([t]) for t in ids]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
