"""WORKER_NUM worker groups behind one API: each request goes to the live group with the fewest
outstanding requests (running + waiting for a concurrency slot).

Each group has its own scheduler, KV cache and MAX_CONCURRENCY, so a slow group never blocks
another. A group whose shard dies fails its in-flight requests (5xx) and takes no new ones; the
pool is dead only when every group is.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator

from router.engine.async_engine import AsyncEngine
from router.engine.outputs import EngineDeadError, RequestOutput
from router.params import GenerationParams

# Summed across groups in /stats; the rest are per group only.
_SUMMED = (
    "running",
    "waiting",
    "queued",
    "active_requests",
    "max_concurrency",
    "kv_blocks_total",
    "kv_blocks_used",
    "kv_blocks_free",
    "prefix_cache_blocks",
    "preemptions",
    "draft_tokens_proposed",
    "draft_tokens_accepted",
)


class EnginePool:
    def __init__(self, engines: list[AsyncEngine]) -> None:
        assert engines
        self.engines = engines
        self.dispatched = [0] * len(engines)

    @property
    def dead(self) -> str | None:
        if all(e.dead for e in self.engines):
            return "; ".join(f"group {i}: {e.dead}" for i, e in enumerate(self.engines))
        return None

    def start(self) -> None:
        for e in self.engines:
            e.start()

    async def stop(self) -> None:
        for e in self.engines:
            await e.stop()

    @property
    def outstanding(self) -> int:
        """Requests in flight or waiting for a slot, over every group."""
        return sum(e.outstanding for e in self.engines)

    @property
    def dead_groups(self) -> list[int]:
        return [i for i, e in enumerate(self.engines) if e.dead]

    def admit(self, num_prompt_tokens: int) -> None:
        """Raise Overloaded if the group this request would go to has too much waiting (the
        least loaded one: if it is full, so are the others)."""
        self.engines[self._pick(set())].admit(num_prompt_tokens)

    def stuck_for(self) -> float:
        """The longest time a live group's step in flight has taken so far."""
        return max((e.stuck_for() for e in self.engines if not e.dead), default=0.0)

    def _pick(self, exclude: set[int]) -> int:
        live = [i for i, e in enumerate(self.engines) if not e.dead and i not in exclude]
        if not live:
            raise EngineDeadError(self.dead or "no live worker group")
        return min(live, key=lambda i: (self.engines[i].outstanding, self.dispatched[i]))

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: GenerationParams,
        detokenize: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        # A group can die while idle without anyone noticing until its next step: a request
        # that fails before its first output is retried on another group, so it is not lost.
        tried: set[int] = set()
        while True:
            i = self._pick(tried)
            self.dispatched[i] += 1
            started = False
            inner = self.engines[i].generate(request_id, prompt_token_ids, params, detokenize)
            try:
                # aclosing: a consumer that stops early (client gone) aborts the request now
                async with contextlib.aclosing(inner):
                    async for out in inner:
                        started = True
                        yield out
                return
            except EngineDeadError:
                if started or len(self.engines) == 1:
                    raise
                tried.add(i)

    def stats(self) -> dict:
        groups = [e.stats() for e in self.engines]
        if len(groups) == 1:
            return groups[0]
        out: dict = {k: sum(g[k] for g in groups) for k in _SUMMED}
        out["finished"] = dict(sum((Counter(g["finished"]) for g in groups), Counter()))
        out["dead"] = self.dead
        out["groups"] = [
            {"group": i, "dispatched": n, **g}
            for i, (n, g) in enumerate(zip(self.dispatched, groups))
        ]
        return out
