"""Whether draft trees pay, measured: lookahead drafts only where they are expected to give
more tokens per second than plain decoding.

A decode step that carries trees runs more rows, and on CPU it also runs eagerly where a plain
decode step runs compiled (shards/compiled_decode.py): there it can cost 2-3x a plain step,
and drafts accepted less often than that make decoding slower. So every decode-only step's
time (planning, drafting and the shard's round trip) goes into a running average per batch
size and mean context length (powers of two), one for plain steps and one for steps with
trees, and so do the draft tokens that steps with trees got accepted. What a step's trees
gain is measured over the whole step, not predicted from each sequence's acceptance: with
many sequences the step's draft room covers only some of them, and some find nothing to
draft. A step of n sequences drafts when (n + accepted) / tree time > n / plain time. Now and
then a step takes the other choice, so the costs and the gain stay measured as contexts grow
and the text changes; and while steps run without trees, each sequence's shadow chains
(router/lookahead/shadow_drafts.py), drafted as a step with trees would have drafted them, keep
measuring the gain at no cost.

A step in which one sequence verifies its tree runs compiled at a padded row count
(ShardInfo.tree_rows), and on CPU each row costs: a 16-row step of the embedded model costs
about 1.5 plain steps, an 8-row one 1.2-1.4. Whether a bigger tree's extra tokens are worth its
rows is measured the same way, per padded row count: the tree gets the size whose steps have
been giving the most tokens per second, and now and then another size.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# One decode step in this many explores the choice not taken, and k times as rarely where the
# choice taken gives k times the tokens per second (a losing tree step costs about k plain
# ones; a plain step among winning trees gives 1/k of their tokens): exploring never costs
# more than ~1/16 of the time.
EXPLORE_EVERY = 16
TREES_EXPLORED_LESS = 4
_SMOOTHING = 0.2  # weight of the newest step in each average


def batch_bucket(num_seqs: int) -> int:
    return 1 << max(num_seqs - 1, 0).bit_length()


def step_bucket(num_seqs: int, context: int) -> tuple[int, int]:
    """Steps are compared within buckets of batch size and mean context length (powers of
    two): attention makes a step's cost grow with its contexts (a plain step of 16 sequences
    took 120 ms at ~1,000 tokens each and 55 ms at ~100), and a time measured in a workload
    with long contexts would otherwise stand for a later one with short contexts."""
    return batch_bucket(num_seqs), max(64, 1 << max(context - 1, 0).bit_length())


Key = tuple[int, int]


# A step's time is the lower median of the last few of its bucket: a one-off stall (a
# collection, the heap trimmed, a page fault) moved an average enough to make plain steps look
# 2-6x slower than they were, and as the losing choice they were then seldom measured again.
RECENT_STEPS = 5


def _recent(times: dict, recent: dict, key, seconds: float) -> None:
    last = recent.setdefault(key, deque(maxlen=RECENT_STEPS))
    last.append(seconds)
    times[key] = sorted(last)[(len(last) - 1) // 2]


def _average(avg: dict, key, value: float) -> None:
    old = avg.get(key)
    avg[key] = value if old is None else old + _SMOOTHING * (value - old)


@dataclass
class StepCosts:
    plain: dict[Key, float] = field(default_factory=dict)  # step bucket -> seconds per step
    tree: dict[Key, float] = field(default_factory=dict)
    # step bucket -> accepted draft tokens per sequence of a step with trees: the mean, and
    # the lower median (what the sequence in the middle got; zero when fewer than half gain)
    accepted: dict[Key, float] = field(default_factory=dict)
    accepted_low: dict[Key, float] = field(default_factory=dict)
    steps_since_explore: int = 0
    # one sequence's compiled tree steps, by padded row count: seconds, accepted tokens
    rows_time: dict[int, float] = field(default_factory=dict)
    rows_accepted: dict[int, float] = field(default_factory=dict)
    rows_since_explore: int = 0
    # the last few times behind plain, tree and rows_time
    _plain_times: dict = field(default_factory=dict)
    _tree_times: dict = field(default_factory=dict)
    _rows_times: dict = field(default_factory=dict)

    def observe(
        self,
        num_seqs: int,
        accepted: list[int] | None,
        seconds: float,
        padded_rows: int | None = None,
        context: int = 0,
    ) -> None:
        """A decode-only step (each sequence ran one token or one tree), the draft tokens
        each sequence got accepted (None: it carried no trees), its time, for one sequence's
        tree the row count its step was padded to, and its sequences' mean length."""
        if seconds <= 0 or num_seqs == 0:
            return
        key = step_bucket(num_seqs, context)
        if accepted is None:
            _recent(self.plain, self._plain_times, key, seconds)
        else:
            _recent(self.tree, self._tree_times, key, seconds)
            self._observe_accepted(key, accepted)
            if padded_rows is not None:
                _recent(self.rows_time, self._rows_times, padded_rows, seconds)
                _average(self.rows_accepted, padded_rows, sum(accepted))

    def observe_rows_accepted(self, padded_rows: int, accepted: int) -> None:
        """What a tree of this padded row count would have got accepted in a step that ran
        a bigger one (router/lookahead/drafter.py: Drafter.observe)."""
        _average(self.rows_accepted, padded_rows, accepted)

    def observe_shadow(self, num_seqs: int, accepted: list[float], context: int = 0) -> None:
        """What the unverified drafts of a step of this many sequences, of this mean
        length, would have got accepted (router/lookahead/drafter.py: Drafter.shadow)."""
        if accepted:
            self._observe_accepted(step_bucket(num_seqs, context), accepted)

    def _observe_accepted(self, key: Key, accepted: list) -> None:
        # per sequence: a bucket mixes step sizes
        _average(self.accepted, key, sum(accepted) / len(accepted))
        _average(self.accepted_low, key, sorted(accepted)[(len(accepted) - 1) // 2])

    def best_rows(self, candidates: list[int]) -> int:
        """Of these padded row counts (ascending), the one whose tree steps have given the
        most tokens per second; unmeasured ones first, smallest first."""
        unmeasured = [r for r in candidates if r not in self.rows_time]
        if unmeasured:
            return unmeasured[0]
        rate = {r: (1 + self.rows_accepted[r]) / self.rows_time[r] for r in candidates}
        best = max(candidates, key=lambda r: (rate[r], -r))
        self.rows_since_explore += 1
        if len(candidates) > 1 and self.rows_since_explore >= EXPLORE_EVERY:
            self.rows_since_explore = 0
            others = [r for r in candidates if r != best]
            return min(others, key=lambda r: abs(r - best))
        return best

    def worth_drafting(self, num_decodes: int, queued: bool = False, context: int = 0) -> bool:
        """Whether a decode step of this many sequences, of this mean length, should carry
        trees; `queued`: requests are waiting for a place in the batch."""
        if num_decodes == 0:
            return False
        key = step_bucket(num_decodes, context)
        plain, tree = self.plain.get(key), self.tree.get(key)
        every = EXPLORE_EVERY
        if plain is None or tree is None:
            choice = tree is None  # measure whichever is unknown first
        else:
            # With requests queued, a sequence that finishes sooner hands its place on: the
            # step's tokens per second are what counts, and its mean acceptance. Without, the
            # sequences run to their ends together, and tokens that only some gain make the
            # others, slowed by every costlier step, finish later: then the gain is the
            # middle sequence's.
            accepted = (self.accepted if queued else self.accepted_low)[key]
            # tokens per second with trees over without: the loser is explored that much
            # more rarely, whichever it is; losing trees another TREES_EXPLORED_LESS times
            # as rarely, since shadow chains keep measuring what they would get accepted and
            # an exploring step only refreshes what they cost
            gain = (1 + accepted) * plain / tree
            choice = gain > 1
            every = round(EXPLORE_EVERY * (gain if choice else TREES_EXPLORED_LESS / gain))
        self.steps_since_explore += 1
        if self.steps_since_explore >= every:
            self.steps_since_explore = 0
            return not choice
        return choice
