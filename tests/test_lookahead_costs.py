"""Lookahead drafts only where trees have been giving more tokens per second (no model)."""

from __future__ import annotations

from router.lookahead_costs import CLEAR_LOSS, EXPLORE_EVERY, StepCosts


def _decide(costs: StepCosts, n: int, steps: int) -> list[bool]:
    return [costs.worth_drafting(n) for _ in range(steps)]


def test_unmeasured_batch_sizes_try_trees_then_plain_steps():
    costs = StepCosts()
    assert costs.worth_drafting(3)  # nothing measured: trees first
    costs.observe(3, True, tokens=9, seconds=0.03)
    assert not costs.worth_drafting(4)  # same bucket: plain steps are still unmeasured


def test_trees_that_give_fewer_tokens_per_second_stop_drafting():
    costs = StepCosts()
    costs.observe(1, False, tokens=1, seconds=0.010)  # 100 tokens/s plain
    costs.observe(1, True, tokens=2, seconds=0.025)  # 80 tokens/s with trees
    choices = _decide(costs, 1, 4 * EXPLORE_EVERY)
    assert choices.count(True) <= 4  # only the rare exploration steps draft


def test_trees_that_pay_draft_and_still_explore_plain_steps():
    costs = StepCosts()
    costs.observe(16, False, tokens=16, seconds=0.10)  # 160 tokens/s
    costs.observe(16, True, tokens=40, seconds=0.20)  # 200 tokens/s: within CLEAR_LOSS
    assert CLEAR_LOSS > 200 / 160
    choices = _decide(costs, 16, 2 * EXPLORE_EVERY)
    assert choices.count(False) == 2  # one exploration each EXPLORE_EVERY steps


def test_the_averages_follow_a_change():
    costs = StepCosts()
    costs.observe(2, False, tokens=2, seconds=0.02)
    costs.observe(2, True, tokens=8, seconds=0.03)
    assert costs.tree[2].per_second > costs.plain[2].per_second
    for _ in range(20):  # the text stops matching: trees now give one token each
        costs.observe(2, True, tokens=2, seconds=0.03)
    assert costs.tree[2].per_second < costs.plain[2].per_second
    assert not costs.worth_drafting(2)


def test_steps_with_no_time_are_ignored():
    costs = StepCosts()
    costs.observe(1, False, tokens=1, seconds=0.0)  # fabricated results in scheduler tests
    assert costs.plain == {}
