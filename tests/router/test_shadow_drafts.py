"""Shadow chains (router/lookahead/shadow_drafts.py): drafts never verified, checked against the
tokens that follow, teach the cost gate and a sequence's acceptance average when trees pay again."""

from __future__ import annotations

from router.lookahead.drafter import RESUME_BUDGET, Drafter
from router.lookahead.shadow_drafts import ShadowChains


def test_a_chain_settles_at_its_first_wrong_token_or_at_its_end():
    chains = ShadowChains()
    chains.add([7, 8, 9], at=2)
    chains.add([8, 5], at=3)
    assert chains.settle([1, 2, 7]) == []  # right so far, and not begun
    assert chains.settle([1, 2, 7, 8]) == []
    # 4 where 9 and 5 were guessed: two right of the first, one of the second
    assert chains.settle([1, 2, 7, 8, 4]) == [2, 1] and chains.pending == []
    chains.add([1, 2], at=0)
    assert chains.settle([1, 2]) == [2]  # right to its end


def test_a_sequence_accepting_nothing_resumes_when_its_shadow_chains_come_true():
    d = Drafter(max_depth=8, max_branches=2)
    passage = [20, 21, 22, 23, 24, 25, 26, 27]
    tokens = [5, *passage, 6, 20]
    d.track(1, tokens)
    for _ in range(20):
        d.record(1, 4, 0)  # it accepted nothing for a while
    steps = 0
    while d.budget_for(1, tokens) == 0:  # no tree: shadow chains of RESUME_BUDGET tokens
        steps += 1
        tokens = tokens + [passage[steps]]  # ... and the model quotes the passage again
    assert steps == RESUME_BUDGET  # the first chain, right to its end
    assert d.states[1].accepted_ema >= 0.1


def test_steps_without_trees_learn_from_shadow_chains_that_trees_pay_again():
    d = Drafter(max_depth=8)
    d.costs.observe(1, accepted=None, seconds=0.040)
    d.costs.observe(1, accepted=[0], seconds=0.055)  # the model stopped quoting: trees lose
    passage = list(range(20, 40))
    tokens = [5, *passage, 6, 20]  # then it quotes the passage again, a token per plain step
    steps = 0
    while not d.drafts_pay(1, with_prefill=False):
        d.shadow([(1, tokens)])
        steps += 1
        tokens = tokens + [passage[steps]]
    # the first chain (as deep as a tree would be) settles right to its end: trees pay; an
    # exploring step would come after 16 to 20
    assert steps == 8 + 1 and d.costs.accepted[1, 64] > 55 / 40 - 1


def test_a_step_s_shadow_chains_count_once_each_within_its_share_of_the_draft_room():
    d = Drafter(max_depth=8, step_budget=32)
    seqs = [(i, [1, 2, 3, 1, 2]) for i in range(16)]  # each would draft (3, 1, 2)
    # 16 sequences share 16 draft tokens as a step with trees would: the first wants 12
    # (4 x 2.0 + 4), the second gets the 4 left, the others none
    d.shadow(seqs)
    assert [len(d.states[i].shadows.pending) for i in range(3)] == [1, 1, 0]
    assert d.costs.accepted == {(16, 64): 0.0}  # 14 with nothing to draft: one observation
    d.shadow([(i, t + [3, 1, 2]) for i, t in seqs])
    # both chains right to their end (3 tokens each), 14 zeros again: one observation
    assert d.costs.accepted[16, 64] == 0.8 * 0.0 + 0.2 * (6 / 16)
