"""Router process entry point: the HTTP server in front of the shards.

    SHARDSERVE_ROUTER_SETTINGS=JSON python -m router.http.server

It listens at once (health answers 503 while loading), connects to the shards, loads the
tokenizer and template, then serves. A start-up failure exits non-zero; the launcher sees it.

The launcher's DRAIN_SIGNAL drains: readiness and new requests answer 503 while the requests
in flight finish, for up to --shutdown-timeout seconds; then it exits 0. Its STOP_SIGNAL ends it
at once. SIGTERM and SIGINT are the launcher's to act on (shards/wire.py says why).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys

import orjson
import uvicorn

from router.assembly import build_scheduler, build_template
from router.engine.async_engine import AsyncEngine
from router.engine.pool import EnginePool
from router.engine.shard_client import AsyncShardClient
from router.http.context import ServingContext
from router.http.metrics import Metrics
from router.http.routes import Router, create_app
from router.http.tokenizer import load_tokenizer
from router.lookahead.ngrams import TokenKeys
from router.settings import SETTINGS_ENV, RouterSettings
from shards import logs
from shards.wire import DRAIN_SIGNAL, STOP_SIGNAL, leave_stop_signals_to_launcher

log = logging.getLogger("shardserve.router")


async def build_context(s: RouterSettings, metrics: Metrics | None = None) -> ServingContext:
    shards = await asyncio.gather(*(AsyncShardClient.connect(p) for p in s.shard_sockets))
    info = shards[0].info
    tokenizer = await asyncio.to_thread(load_tokenizer, s.model_path, s.trust_remote_code)
    template = build_template(s, tokenizer, info.eos_token_ids)
    keys = None
    if s.use_lookahead:  # one table for every group's drafter
        keys = await asyncio.to_thread(TokenKeys.from_tokenizer, tokenizer)
    engines = []
    for shard in shards:
        scheduler = build_scheduler(s, shard.info, keys)
        engines.append(
            AsyncEngine(
                scheduler,
                shard,
                tokenizer,
                s.max_concurrency,
                metrics.group(len(engines)) if metrics is not None else None,
                max_waiting_requests=s.max_waiting_requests or None,
                max_waiting_tokens=s.max_waiting_tokens or None,
                request_timeout=s.request_timeout or None,
                queue_timeout=s.queue_timeout or None,
            )
        )
    engine = EnginePool(engines)
    if metrics is not None:
        metrics.watch(engine)
    engine.start()
    log.info(
        "serving %s: template %s, context %d, %d worker group(s) of %d KV blocks of %d tokens, "
        "%s attention on %s, %s",
        s.model_name,
        template.name,
        info.max_model_len,
        len(engines),
        info.num_blocks,
        info.block_size,
        info.attention_backend,
        info.device,
        "continuous batching"
        if s.scheduler == "continuous"
        else f"dynamic batching (up to {s.max_batch_size} requests, {s.batch_wait_timeout}s wait)",
    )
    return ServingContext(engine, tokenizer, template, s.model_name, info.max_model_len)


async def log_quality(ctx: ServingContext, quantization: str, num_tokens: int = 1024) -> float:
    """Perplexity of the held-out text (router/http/quality.py) scored through the engine, before
    the server reports ready: the served model's quality as one number in the log."""
    from router.http.quality import eval_tokens
    from router.params import GenerationParams
    from shards.wire import SamplingParams

    ids = eval_tokens(ctx.tokenizer, min(num_tokens, ctx.max_model_len - 1))
    score = GenerationParams(
        max_tokens=1, sampling=SamplingParams(temperature=0.0, prompt_logprobs=0)
    )
    logprobs: list[float] = []
    async for out in ctx.engine.generate("quality-check", ids, score, detokenize=False):
        logprobs += out.prompt_logprobs or []
    ppl = math.exp(-sum(logprobs) / len(logprobs))
    log.info(
        "quality-check: held-out perplexity %.4f over %d tokens (quantization %s)",
        ppl,
        len(logprobs),
        quantization,
    )
    return ppl


def make_app(s: RouterSettings):
    metrics = Metrics()
    router = Router(None, s.api_keys, metrics, s.stuck_step_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async def load() -> None:
            try:
                ctx = await build_context(s, metrics)
                if s.quality_check:
                    await log_quality(ctx, s.quantization)
                router.ctx = ctx
                log.info("ready on http://%s:%d", s.host, s.port)
            except Exception as e:  # any start-up failure ends the process; the launcher reports
                log.error("router failed to start: %s", e)
                os._exit(1)

        task = asyncio.create_task(load())
        yield
        task.cancel()
        if router.ctx is not None:
            await router.ctx.engine.stop()

    app = create_app(router, lifespan=lifespan)
    app.state.router = router
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn, stopped by the launcher: DRAIN_SIGNAL drains (uvicorn's own stop would close the
    port at once, and new requests would be refused rather than answered 503), STOP_SIGNAL stops
    at once. SIGTERM and SIGINT, which uvicorn would act on, are the launcher's: ignored here."""

    def __init__(self, config: uvicorn.Config, router, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.router = router
        self.shutdown_timeout = shutdown_timeout
        self._drain_task: asyncio.Task | None = None

    def listen_to_launcher(self) -> None:
        for sig in (DRAIN_SIGNAL, STOP_SIGNAL):
            signal.signal(sig, self.handle_exit)

    def handle_exit(self, sig, frame) -> None:
        if sig not in (DRAIN_SIGNAL, STOP_SIGNAL):
            return
        ctx = self.router.ctx
        if sig == STOP_SIGNAL or ctx is None:  # nothing to drain while loading
            # uvicorn's graceful exit when nothing is in flight: it also stops the engine
            in_flight = ctx.engine.outstanding if ctx is not None else 0
            self.force_exit = in_flight > 0
            self.should_exit = True
            if in_flight:
                log.warning("stopping now; %d request(s) in flight are cut off", in_flight)
            return
        if self.router.draining:
            return
        self.router.draining = True
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._start_drain, loop)

    def _start_drain(self, loop) -> None:
        self._drain_task = loop.create_task(self._drain())

    async def _drain(self) -> None:
        pool = self.router.ctx.engine
        log.info(
            "draining: %d request(s) in flight, new ones get 503; up to %.0fs to finish",
            pool.outstanding,
            self.shutdown_timeout,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        while pool.outstanding and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if pool.outstanding:
            log.warning(
                "shutdown timeout: %d request(s) still in flight are cut off", pool.outstanding
            )
            self.force_exit = True
        else:
            log.info("drained; stopping")
        self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=f"shardserve router process; reads RouterSettings JSON from ${SETTINGS_ENV}"
    )
    parser.parse_args(argv)
    leave_stop_signals_to_launcher()
    logs.configure()
    s = RouterSettings.from_dict(orjson.loads(os.environ.pop(SETTINGS_ENV)))
    app = make_app(s)
    # log_config=None: uvicorn's loggers reach the handler set above, in its format
    config = uvicorn.Config(
        app, host=s.host, port=s.port, log_level="warning", access_log=False, log_config=None
    )
    server = DrainingServer(config, app.state.router, s.shutdown_timeout)
    server.listen_to_launcher()
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
