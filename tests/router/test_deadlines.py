"""Request and queue deadlines of the async engine, over a fabricated shard (no model): a step
takes a while, so a deadline passes long before the request would end by itself."""

from __future__ import annotations

import asyncio

import pytest

from router.engine.async_engine import AsyncEngine
from router.engine.outputs import Overloaded
from router.params import GenerationParams
from tests.support.scheduling import _result, _sched

STEP_SECONDS = 0.01  # 400 tokens take 4 s; the deadlines below are 0.1 s


class SlowShard:
    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    async def execute(self, plan):
        await asyncio.sleep(STEP_SECONDS)
        return _result(self.scheduler, plan)


def _engine(**deadlines) -> AsyncEngine:
    sched = _sched(max_model_len=1024, num_blocks=512)
    return AsyncEngine(sched, SlowShard(sched), None, 1, **deadlines)


async def _collect(engine, request_id: str, max_tokens: int = 400):
    outs = []
    async for out in engine.generate(request_id, [5, 6, 7], GenerationParams(max_tokens),
                                     detokenize=False):  # fmt: skip
        outs.append(out)
    return outs


def test_a_request_past_its_deadline_ends_with_timeout_and_frees_its_blocks():
    async def main():
        engine = _engine(request_timeout=0.1)
        engine.start()
        outs = await _collect(engine, "r1")
        await engine.stop()
        return engine, outs

    engine, outs = asyncio.run(main())
    last = outs[-1]
    assert last.finished and last.finish_reason == "timeout"
    assert 0 < last.num_output_tokens < 400  # it ran, and was cut
    assert sum(len(o.token_ids) for o in outs) == last.num_output_tokens
    alloc = engine.scheduler.allocator
    assert all(alloc.ref_count(b) == 0 for b in range(alloc.num_blocks))  # every block released
    assert not engine.scheduler.has_unfinished()
    assert engine.accounting.finished_by_reason == {"timeout": 1}


def test_a_request_that_cannot_start_in_time_is_refused_and_the_first_unharmed():
    async def main():
        engine = _engine(queue_timeout=0.1)
        engine.start()
        first = asyncio.create_task(_collect(engine, "first", max_tokens=30))
        await asyncio.sleep(0)  # the first takes the only slot
        with pytest.raises(Overloaded) as refused:
            await _collect(engine, "second")
        outs = await first
        await engine.stop()
        return engine, refused.value, outs

    engine, refused, outs = asyncio.run(main())
    assert refused.reason == "queue_timeout"
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 30
    assert engine.admission.num_waiting == 0 and engine.admission.num_waiting_tokens == 0
