"""Lookahead drafts only where trees have been giving more tokens per second (no model)."""

from __future__ import annotations

from router.lookahead.costs import EXPLORE_EVERY, TREES_EXPLORED_LESS, StepCosts


def _decide(costs: StepCosts, n: int, steps: int) -> list[bool]:
    return [costs.worth_drafting(n) for _ in range(steps)]


def test_unmeasured_batch_sizes_try_trees_then_plain_steps():
    costs = StepCosts()
    assert costs.worth_drafting(3)  # nothing measured: trees first
    costs.observe(3, accepted=[2, 2, 2], seconds=0.03)
    assert not costs.worth_drafting(4)  # same bucket: plain steps still unmeasured


def test_trees_draft_where_their_gain_outweighs_their_cost():
    costs = StepCosts()
    costs.observe(1, accepted=None, seconds=0.010)
    costs.observe(1, accepted=[2], seconds=0.025)  # 3 tokens for the time of 2.5 plain steps
    every = round(EXPLORE_EVERY * 1.2)  # trees give 1.2x the tokens per second
    assert _decide(costs, 1, every - 1) == [True] * (every - 1)
    assert not costs.worth_drafting(1)  # the exploration step runs plain


def test_winning_trees_explore_plain_steps_as_rarely_as_they_cost():
    costs = StepCosts()
    costs.observe(1, accepted=None, seconds=0.04)
    costs.observe(1, accepted=[5], seconds=0.06)  # 6 tokens for 1.5 steps' time: 4x
    choices = _decide(costs, 1, 4 * EXPLORE_EVERY)
    assert choices.count(False) == 1  # one plain step in 4 x 16


def test_losing_trees_are_explored_as_rarely_as_they_cost():
    costs = StepCosts()
    costs.observe(16, accepted=None, seconds=0.06)
    # 4 steps' time, and the sequence in the middle gets nothing
    costs.observe(16, accepted=[1] * 4 + [0] * 12, seconds=0.24)
    # one exploration in 4 x 16 steps, and TREES_EXPLORED_LESS times as rarely again
    every = 4 * EXPLORE_EVERY * TREES_EXPLORED_LESS
    assert _decide(costs, 16, every).count(True) == 1


def test_the_gain_counts_every_sequence_even_those_not_drafting():
    costs = StepCosts()
    costs.observe(4, accepted=None, seconds=0.020)
    costs.observe(4, accepted=[1, 0, 0, 0], seconds=0.030)  # one accepted token for four sequences
    assert not costs.worth_drafting(4)  # 5 tokens for 1.5x the time


def test_the_averages_follow_a_change():
    costs = StepCosts()
    costs.observe(2, accepted=None, seconds=0.02)
    costs.observe(2, accepted=[3, 3], seconds=0.03)
    assert costs.worth_drafting(2)
    for _ in range(20):  # the text stops matching: trees give nothing
        costs.observe(2, accepted=[0, 0], seconds=0.03)
    assert not costs.worth_drafting(2)


def test_steps_with_no_time_are_ignored():
    costs = StepCosts()
    costs.observe(1, accepted=None, seconds=0.0)  # fabricated results in scheduler tests
    assert costs.plain == {}


def test_tree_sizes_are_measured_and_the_faster_one_is_taken():
    costs = StepCosts()
    assert costs.best_rows([8, 16]) == 8  # unmeasured: smallest first
    costs.observe(1, accepted=[6], seconds=0.030, padded_rows=8)
    assert costs.best_rows([8, 16]) == 16  # then the other
    costs.observe(1, accepted=[7], seconds=0.050, padded_rows=16)  # 8/0.05 < 7/0.03
    picks = [costs.best_rows([8, 16]) for _ in range(2 * EXPLORE_EVERY)]
    assert picks.count(16) == 2 and picks.count(8) == 2 * EXPLORE_EVERY - 2  # explored rarely
    for _ in range(10):  # bigger trees start paying
        costs.observe(1, accepted=[14], seconds=0.040, padded_rows=16)
    assert costs.best_rows([8, 16]) == 16


def test_without_a_queue_the_middle_sequence_s_gain_decides():
    costs = StepCosts()
    costs.observe(4, accepted=None, seconds=0.020)
    costs.observe(4, accepted=[8, 0, 0, 0], seconds=0.030)  # one sequence quotes, 3 do not
    # with requests waiting, the one that finishes sooner hands its place on: 12 tokens for
    # 1.5 steps' time pays; run together to their ends, the three are only slowed
    assert costs.worth_drafting(4, queued=True)
    assert not costs.worth_drafting(4, queued=False)
    for _ in range(10):  # then most of them gain: the one in the middle 1 token a step
        costs.observe(4, accepted=[8, 2, 1, 0], seconds=0.030)
    assert costs.worth_drafting(4, queued=False)


def test_costs_measured_at_long_contexts_do_not_stand_for_short_ones():
    costs = StepCosts()
    costs.observe(16, accepted=None, seconds=0.120, context=1000)  # attention over 16 x 1,000
    costs.observe(16, accepted=[1] * 16, seconds=0.160, context=1000)
    assert costs.worth_drafting(16, context=1000)  # twice the tokens for 1.33x the time
    costs.observe(16, accepted=None, seconds=0.055, context=100)
    assert costs.worth_drafting(16, context=100)  # trees not measured at this length yet
    costs.observe(16, accepted=[1] * 2 + [0] * 14, seconds=0.085, context=100)
    assert not costs.worth_drafting(16, context=100)
    assert costs.worth_drafting(16, context=1000)


def test_a_one_off_stall_does_not_move_a_step_s_time():
    costs = StepCosts()
    for seconds in (0.040, 0.041, 0.300, 0.039):  # the third: the heap trimmed, say
        costs.observe(1, accepted=None, seconds=seconds)
    assert costs.plain[1, 64] == 0.040
    for _ in range(3):  # a lasting change is followed
        costs.observe(1, accepted=None, seconds=0.060)
    assert costs.plain[1, 64] == 0.060
