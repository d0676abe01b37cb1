"""The async engine's step loop over a fabricated shard (no model): each step's outputs reach
their streams while the next step runs, and a stop string found then still ends the text and
the sequence exactly where plain decoding would."""

from __future__ import annotations

import asyncio

from router.engine.async_engine import AsyncEngine
from router.params import GenerationParams
from tests.support.scheduling import _result, _sched

LETTERS = "abcdefghij"
FIRST = 10  # token FIRST + i is LETTERS[i] (ids below are the helpers' EOS and the prompt's)


class Letters:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(LETTERS[i - FIRST] for i in ids if 0 <= i - FIRST < len(LETTERS))


class CountingShard:
    """Answers output token k of a sequence with LETTERS[k], and notes at each plan how many outputs
    the request's consumer had received."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.received = 0
        self.at_plan: list[int] = []

    async def execute(self, plan):
        self.at_plan.append(self.received)
        await asyncio.sleep(0.001)  # the forward: the event loop runs meanwhile
        return _result(self.scheduler, plan, lambda seq: FIRST + seq.num_output_tokens)


def _generate(params: GenerationParams):
    async def main():
        sched = _sched(max_model_len=256, num_blocks=64)
        shard = CountingShard(sched)
        engine = AsyncEngine(sched, shard, Letters(), 1)
        engine.start()
        outs = []
        async for out in engine.generate("r1", [30, 31, 32], params):
            outs.append(out)
            shard.received += 1
        await engine.stop()
        return engine, shard, outs

    return asyncio.run(main())


def test_a_steps_outputs_are_published_while_the_next_step_runs():
    engine, shard, outs = _generate(GenerationParams(max_tokens=5))
    # the plan of step k + 1 leaves before step k's output reaches the consumer (a last plan
    # may follow, telling the shard the sequence is gone)
    assert shard.at_plan[:5] == [0, 0, 1, 2, 3]
    assert "".join(o.text for o in outs) == "abcde"
    assert [t for o in outs for t in o.token_ids] == [FIRST + k for k in range(5)]
    assert outs[-1].finished and outs[-1].finish_reason == "length"


def test_a_stop_string_found_during_the_next_step_ends_the_sequence_where_it_is():
    engine, shard, outs = _generate(GenerationParams(max_tokens=8, stop=("cd",)))
    assert "".join(o.text for o in outs) == "ab"
    last = outs[-1]
    assert last.finished and last.finish_reason == "stop"
    # the token that completed the stop string is the last one; the step already running when
    # it was found ran for nothing and gave the request no token
    assert [t for o in outs for t in o.token_ids] == [FIRST + k for k in range(4)]
    assert last.num_output_tokens == 4
    alloc = engine.scheduler.allocator
    assert all(alloc.ref_count(b) == 0 for b in range(alloc.num_blocks))
    assert not engine.scheduler.has_unfinished()
