"""Lookahead on the router side (no torch): n-gram drafts, tree layout, adaptive budgets, and the
scheduler verifying trees against a fake greedy model with a fake paged KV cache: outputs equal
plain decoding, K/V stay where attention reads them, budgets and blocks hold."""

from __future__ import annotations

import random

from router.lookahead.drafter import Drafter, NgramIndex, build_tree
from router.params import GenerationParams
from router.scheduling.block_allocator import BlockAllocator
from router.scheduling.scheduler import Scheduler, SchedulerConfig
from router.scheduling.sequence import Sequence
from shards.wire import SamplingParams, ScheduledSeq, SeqOutput, StepPlan, StepResult

GREEDY = SamplingParams(temperature=0.0)


def test_index_continues_the_longest_earlier_match_most_recent_first():
    idx = NgramIndex(max_ngram=3)
    idx.extend([7, 1, 2, 3, 9, 1, 2, 4, 5, 1, 2])
    # (1, 2) occurred twice before the end; the later occurrence is the first guess
    assert idx.continuations(depth=3, limit=4) == [[4, 5, 1], [3, 9, 1]]
    assert idx.continuations(depth=3, limit=1) == [[4, 5, 1]]
    idx.extend([8])  # nothing ever followed 8 ... but (8,) is new: no earlier occurrence
    assert idx.continuations(depth=3, limit=4) == []


def test_tree_merges_common_prefixes_depth_first_best_branch_first():
    tree = build_tree([[5, 6, 7], [5, 8], [9]], budget=10)
    assert tree.tokens == [5, 6, 7, 8, 9]
    assert tree.parents == [0, 1, 2, 1, 0]
    capped = build_tree([[5, 6, 7], [5, 8], [9]], budget=3)
    assert capped.tokens == [5, 6, 7] and capped.parents == [0, 1, 2]


def test_budget_follows_acceptance_within_depth_times_branches():
    d = Drafter(max_depth=8, max_branches=2)
    tokens = [1, 2, 3, 4, 9, 1, 2]
    assert d.budget_for(1, tokens) == 12  # hopeful start: 4 * 2.0 + 4
    for _ in range(20):
        d.record(1, 4, 1)
    assert d.budget_for(1, tokens) == 8
    for _ in range(20):
        d.record(1, 8, 8)
    assert d.budget_for(1, tokens) == 16  # capped at depth x branches


def test_shared_pool_drafts_from_other_requests_output():
    d = Drafter(max_depth=4)
    d.track(1, [1, 2])
    d.forget(1, [40, 41, 42, 43, 44])
    tree = d.propose(2, [9, 9, 40, 41], budget=4)
    assert tree is not None and tree.tokens == [42, 43, 44]


# -- the scheduler against a fake greedy model --------------------------------------------------


def _next(prefix: list[int]) -> int:
    """A deterministic 'model': the next token from the last two (vocab 10..14), periodic enough
    for drafts to hit and miss."""
    return 10 + (prefix[-1] * 3 + prefix[-2]) % 5


class FakeShard:
    """Greedy verification as the runner does it, over a fake paged cache that stores, per slot,
    the token prefix real K/V would depend on."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.kv: dict[int, tuple[int, ...]] = {}
        self.moves = 0

    def execute(self, plan: StepPlan) -> StepResult:
        bs = self.sched.block_size
        self.moves += len(plan.kv_moves)
        moved = {dst: self.kv.get(src) for src, dst in plan.kv_moves}
        self.kv.update(moved)
        outputs = []
        for s in plan.seqs:
            tokens = self.sched.seqs[s.seq_id].token_ids
            for pos in range(s.start_pos):  # what attention reads must be this sequence's
                assert self.kv.get(s.block_table[pos // bs] * bs + pos % bs) == tuple(
                    tokens[: pos + 1]
                ), f"seq {s.seq_id} position {pos}"
            prefix = tokens[: s.start_pos]
            if s.draft_parents is None:
                for i, t in enumerate(s.token_ids):
                    pos = s.start_pos + i
                    self.kv[s.block_table[pos // bs] * bs + pos % bs] = (*prefix, t)
                    prefix = [*prefix, t]
                if s.sample:
                    outputs.append(SeqOutput(s.seq_id, [_next(prefix)]))
                continue
            # tree node i sits at slot start + i; its K/V depend on its path from the root
            paths = [[*prefix, s.token_ids[0]]]
            for i, parent in enumerate(s.draft_parents, start=1):
                paths.append([*paths[parent], s.token_ids[i]])
            for i, path in enumerate(paths):
                pos = s.start_pos + i
                self.kv[s.block_table[pos // bs] * bs + pos % bs] = tuple(path)
            node, accepted = 0, []
            while True:
                want = _next(paths[node])
                child = next(
                    (c for c, p in enumerate(s.draft_parents, start=1)
                     if p == node and s.token_ids[c] == want),
                    None,
                )  # fmt: skip
                if child is None:
                    break
                accepted.append(child)
                node = child
            tokens_out = [s.token_ids[c] for c in accepted] + [_next(paths[node])]
            outputs.append(SeqOutput(s.seq_id, tokens_out, accepted=accepted))
        return StepResult(plan.step_id, outputs)


def _simulate(seed: int, drafter: Drafter | None) -> tuple[dict[int, list[int]], FakeShard]:
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4, 8])
    max_len = rng.randrange(24, 96)
    budget = rng.randrange(4, 64)
    config = SchedulerConfig(budget, rng.randrange(1, 9), max_len, ())
    blocks = rng.randrange(-(-max_len // bs), 4 * -(-max_len // bs) + 1)
    sched = Scheduler(config, BlockAllocator(blocks, bs, rng.random() < 0.8), drafter)
    shard = FakeShard(sched)
    seqs = []
    for seq_id in range(1, rng.randrange(2, 12)):
        prompt = [rng.randrange(10, 15) for _ in range(rng.randrange(2, max_len // 2))]
        params = GenerationParams(max_tokens=rng.randrange(1, 40), sampling=GREEDY, ignore_eos=True)
        seqs.append(Sequence(seq_id, f"r{seq_id}", prompt, params))
    arrivals = {rng.randrange(0, 10): [] for _ in seqs}
    for seq in seqs:
        arrivals.setdefault(rng.choice(list(arrivals)), []).append(seq)
    step = 0
    while arrivals or sched.has_unfinished():
        assert step < 5000, "no progress"
        for seq in arrivals.pop(step, []):
            sched.add(seq)
        plan = sched.schedule()
        if plan is not None:
            assert plan.num_tokens <= budget
            sched.update(plan, shard.execute(plan))
        step += 1
    return {s.seq_id: s.output_token_ids for s in seqs}, shard


def test_drafted_decoding_equals_plain_decoding_with_kv_in_place_and_no_leaks():
    proposed = accepted = moves = 0
    for seed in range(200):
        plain, _ = _simulate(seed, None)
        drafted, shard = _simulate(seed, Drafter(max_depth=6, max_branches=3, step_budget=24))
        assert drafted == plain, f"seed {seed}"
        assert shard.sched.allocator.num_used == 0, f"seed {seed}: blocks leaked"
        proposed += shard.sched.num_draft_proposed
        accepted += shard.sched.num_draft_accepted
        moves += shard.moves
    # the fake model's text repeats, so drafts were made, both accepted and rejected, and some
    # accepted paths were not the first branch (their K/V moved)
    assert 0 < accepted < proposed and moves > 0


def test_trees_of_one_sequence_fill_the_padded_row_counts():
    d = Drafter(max_depth=8, max_branches=2, tree_rows=(8, 16, 32))
    assert d.fill_rows(5) == 7  # 6 rows pad to 8: the other two hold draft tokens too
    assert d.fill_rows(16) == 7  # 16 is nearest, 8 unmeasured: tried first
    d.costs.observe(1, accepted=[5], seconds=0.03, padded_rows=8)
    assert d.fill_rows(16) == 15  # then 16 rows
    assert d.fill_rows(0) == 0  # nothing wanted: nothing drafted
    assert Drafter(max_depth=8, tree_rows=()).fill_rows(5) == 5  # no compiled tree steps
    # 32 rows would need more than two branches of 8: never chosen
    d.costs.observe(1, accepted=[15], seconds=0.03, padded_rows=16)
    assert all(d.fill_rows(40) in (7, 15) for _ in range(40))


def test_a_bigger_tree_s_step_measures_what_the_smaller_sizes_would_have_got():
    d = Drafter(max_depth=8, max_branches=2, tree_rows=(8, 16))
    # 11 draft nodes: the first branch 1..8, a second branching after node 3: 9, 10, 11
    parents = [0, 1, 2, 3, 4, 5, 6, 7, 3, 9, 10]
    seq = ScheduledSeq(1, [0] * 12, 40, [0, 1, 2, 3], True, draft_parents=parents)
    out = SeqOutput(1, [5, 6, 7, 8, 9], accepted=[1, 2, 3, 9, 10])  # the second branch won
    d.observe(StepPlan(1, [seq]), StepResult(1, [out]), seconds=0.06)
    assert d.costs.rows_accepted == {16: 5, 8: 3}  # an 8-row tree holds nodes 1..7 only
    assert d.costs.rows_time == {16: 0.06}
