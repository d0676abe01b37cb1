"""The HTTP surface: starlette routes, bearer-token auth, OpenAI-shaped errors, health and
metrics.

Nothing malformed reaches the engine: the body is parsed (orjson) and validated (pydantic)
first, and every failure is answered as {"error": {...}} with its status. A request that would
wait past the bounds (--max-waiting-requests, --max-waiting-tokens) gets 429 with Retry-After.

Health: `/health/live` is 200 while the process is up and its step loop advances or idles (503
once a step has run past --stuck-step-timeout, e.g. a hung collective, or every worker group
is dead); `/health/ready` is 200 only when loaded, answering, not stuck and not draining after
a stop signal; `/health` is readiness (the spec's health check). `/` is the chat page
(router/http/web/chat.html).
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

import orjson
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from router.engine.outputs import EngineDeadError, Overloaded
from router.http.completions import chat_completions, completions
from router.http.context import ServingContext
from router.http.metrics import CountResponses, Metrics
from router.http.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    validation_error,
)
from router.http.responses import json_response

log = logging.getLogger("shardserve.app")

MAX_BODY_BYTES = 16 * 2**20
# The "online experience": a chat page that calls the API like any client (so it works with
# API keys set: it asks for one). Static, no build step.
CHAT_PAGE = (Path(__file__).parent / "web" / "chat.html").read_bytes()
# Seconds a refused client is told to wait: requests drain in about a step's worth of seconds,
# and a client that comes back sooner is refused again at no cost to anyone else.
RETRY_AFTER_S = 1


def _error(e: APIError, headers: dict | None = None) -> Response:
    response = json_response(e.body(), e.status)
    if headers:
        response.headers.update(headers)
    return response


def _check_content_type(content_type: str | None) -> None:
    """JSON bodies only. A page on any other origin can make a browser POST text/plain or a form
    to localhost without a CORS preflight; refusing those types keeps such pages from driving a
    server that has no API keys. No Content-Type at all (browsers never send that way) is read as
    JSON. 415, not 400: the body may be valid JSON, sent under the wrong type."""
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return
    raise APIError(
        415,
        f"Content-Type {media or '(empty)'!r} is not JSON: send the body with "
        "'Content-Type: application/json' (curl -d alone sends a form; add "
        "-H 'Content-Type: application/json')",
        code="unsupported_media_type",
    )


class Router:
    def __init__(
        self,
        ctx: ServingContext | None,
        api_keys: tuple[str, ...] = (),
        metrics: Metrics | None = None,
        stuck_step_timeout: float = 60.0,
    ) -> None:
        self.ctx = ctx  # None while the shards load
        self.api_keys = tuple(k.encode() for k in api_keys)
        self.metrics = metrics or Metrics()
        self.stuck_step_timeout = stuck_step_timeout
        self.draining = False  # after a stop signal: in-flight requests finish, new ones get 503

    def _authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        # Compare against every key so timing says nothing about which (if any) matched.
        ok = False
        for key in self.api_keys:
            ok |= hmac.compare_digest(given, key)
        if scheme.lower() != "bearer" or not ok:
            raise APIError(
                401,
                "invalid or missing API key (Authorization: Bearer <key>)",
                code="invalid_api_key",
            )

    async def _body(self, request: Request) -> dict:
        _check_content_type(request.headers.get("content-type"))
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from e
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        return body

    def _serving(self, new_request: bool = False) -> ServingContext:
        if self.ctx is None:
            raise APIError(503, "the model is still loading")
        if new_request and self.draining:
            self.metrics.rejected.labels("draining").inc()
            raise APIError(503, "the server is shutting down", code="draining")
        if self.ctx.engine.dead:
            raise APIError(503, self.ctx.engine.dead)
        return self.ctx

    async def _generate(self, request: Request, model, handler) -> Response:
        try:
            self._authorize(request)
            ctx = self._serving(new_request=True)
            try:
                req = model.model_validate(await self._body(request))
            except ValidationError as e:
                raise validation_error(e) from e
            return await handler(ctx, request, req)
        except APIError as e:
            return _error(e)
        except EngineDeadError as e:
            return _error(APIError(503, str(e)))
        except Overloaded as e:
            self.metrics.rejected.labels(e.reason).inc()
            log.warning("refused a request: %s", e)
            err = APIError(429, str(e), code=e.reason)
            return _error(err, {"retry-after": str(RETRY_AFTER_S)})

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, ChatCompletionRequest, chat_completions)

    async def completion(self, request: Request) -> Response:
        return await self._generate(request, CompletionRequest, completions)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
            ctx = self._serving()
        except APIError as e:
            return _error(e)
        return json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": ctx.model_name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "shardserve",
                        "max_model_len": ctx.max_model_len,
                    }
                ],
            }
        )

    def _failing(self) -> dict | None:
        """Why a loaded server is not alive (a dead pool, a stuck step), or None."""
        engine = self.ctx.engine
        if engine.dead:
            return {"status": "dead", "reason": engine.dead}
        seconds = engine.stuck_for()
        if seconds > self.stuck_step_timeout:
            return {"status": "stuck", "step_seconds": round(seconds, 1)}
        return None

    async def live(self, request: Request) -> Response:
        if self.ctx is None:
            return json_response({"status": "loading"})  # alive: loading is progress
        failing = self._failing()
        return json_response(failing, 503) if failing else json_response({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        if self.ctx is None:
            return json_response({"status": "loading"}, 503)
        failing = self._failing() or ({"status": "draining"} if self.draining else None)
        if failing:
            return json_response(failing, 503)
        dead_groups = self.ctx.engine.dead_groups
        if dead_groups:  # degraded: the other worker groups still serve
            return json_response({"status": "ok", "dead_worker_groups": dead_groups})
        return json_response({"status": "ok"})

    async def page(self, request: Request) -> Response:
        return Response(
            CHAT_PAGE, media_type="text/html; charset=utf-8", headers={"cache-control": "no-cache"}
        )

    async def metrics_text(self, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    async def stats(self, request: Request) -> Response:
        try:
            self._authorize(request)
            ctx = self._serving()
        except APIError as e:
            return _error(e)
        return json_response(ctx.engine.stats())


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error(APIError(exc.status_code, exc.detail or "error"))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return _error(APIError(500, f"internal error: {type(exc).__name__}"))


def create_app(router: Router, lifespan=None) -> Starlette:
    routes = [
        Route("/v1/chat/completions", router.chat, methods=["POST"]),
        Route("/v1/completions", router.completion, methods=["POST"]),
        Route("/v1/models", router.models, methods=["GET"]),
        Route("/health", router.ready, methods=["GET"]),
        Route("/health/ready", router.ready, methods=["GET"]),
        Route("/health/live", router.live, methods=["GET"]),
        Route("/metrics", router.metrics_text, methods=["GET"]),
        Route("/stats", router.stats, methods=["GET"]),
        Route("/", router.page, methods=["GET"]),
    ]
    paths = {r.path for r in routes}
    return Starlette(
        routes=routes,
        middleware=[Middleware(CountResponses, metrics=router.metrics, routes=paths)],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
