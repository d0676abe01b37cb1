"""Whether draft trees pay, measured: lookahead drafts only where they are expected to give
more tokens per second than plain decoding.

A decode step that carries trees runs more rows, and on CPU it also runs eagerly where a plain
decode step runs compiled (shards/compiled_decode.py): there it can cost 2-3x a plain step,
and drafts accepted less often than that make decoding slower. So every decode-only step's
time (planning, drafting and the shard's round trip) goes into a running average per batch
size (powers of two), one for plain steps and one for steps with trees, and so do the draft
tokens that steps with trees got accepted. What a step's trees gain is measured over the whole
step, not predicted from each sequence's acceptance: with many sequences the step's draft room
covers only some of them, and some find nothing to draft. A step of n sequences drafts when
(n + accepted) / tree time > n / plain time. Now and then a step takes the other choice, so
the costs and the gain stay measured as contexts grow and the text changes; and while steps
run without trees, each sequence's shadow chains (router/shadow_drafts.py), drafted as a step
with trees would have drafted them, keep measuring the gain at no cost.

A step in which one sequence verifies its tree runs compiled at a padded row count
(ShardInfo.tree_rows), and on CPU each row costs: a 16-row step of the embedded model costs
about 1.5 plain steps, an 8-row one 1.2-1.4. Whether a bigger tree's extra tokens are worth its
rows is measured the same way, per padded row count: the tree gets the size whose steps have
been giving the most tokens per second, and now and then another size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# One decode step in this many explores the choice not taken, and k times as rarely where the
# choice taken gives k times the tokens per second (a losing tree step costs about k plain
# ones; a plain step among winning trees gives 1/k of their tokens): exploring never costs
# more than ~1/16 of the time.
EXPLORE_EVERY = 16
_SMOOTHING = 0.2  # weight of the newest step in each average


def batch_bucket(num_seqs: int) -> int:
    return 1 << max(num_seqs - 1, 0).bit_length()


def _average(avg: dict[int, float], key: int, value: float) -> None:
    old = avg.get(key)
    avg[key] = value if old is None else old + _SMOOTHING * (value - old)


@dataclass
class StepCosts:
    plain: dict[int, float] = field(default_factory=dict)  # batch bucket -> seconds per step
    tree: dict[int, float] = field(default_factory=dict)
    accepted: dict[int, float] = field(default_factory=dict)  # bucket -> per step with trees
    steps_since_explore: int = 0
    # one sequence's compiled tree steps, by padded row count: seconds, accepted tokens
    rows_time: dict[int, float] = field(default_factory=dict)
    rows_accepted: dict[int, float] = field(default_factory=dict)
    rows_since_explore: int = 0

    def observe(
        self, num_seqs: int, accepted: int | None, seconds: float, padded_rows: int | None = None
    ) -> None:
        """A decode-only step (each sequence ran one token or one tree), the draft tokens it
        got accepted (None: it carried no trees), its time, and for one sequence's tree the
        row count its step was padded to."""
        if seconds <= 0 or num_seqs == 0:
            return
        key = batch_bucket(num_seqs)
        if accepted is None:
            _average(self.plain, key, seconds)
        else:
            _average(self.tree, key, seconds)
            _average(self.accepted, key, accepted / num_seqs)  # per sequence: buckets mix n
            if padded_rows is not None:
                _average(self.rows_time, padded_rows, seconds)
                _average(self.rows_accepted, padded_rows, accepted)

    def observe_shadow(self, num_seqs: int, accepted: float) -> None:
        """What the unverified drafts of a step of this many sequences would have got
        accepted, per sequence (router/lookahead.py: Drafter.shadow)."""
        _average(self.accepted, batch_bucket(num_seqs), accepted)

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

    def worth_drafting(self, num_decodes: int) -> bool:
        """Whether a decode step of this many sequences should carry trees."""
        if num_decodes == 0:
            return False
        key = batch_bucket(num_decodes)
        plain, tree = self.plain.get(key), self.tree.get(key)
        every = EXPLORE_EVERY
        if plain is None or tree is None:
            choice = tree is None  # measure whichever is unknown first
        else:
            # tokens per second with trees over without: the loser is explored that much
            # more rarely, whichever it is
            gain = (1 + self.accepted[key]) * plain / tree
            choice = gain > 1
            every = round(EXPLORE_EVERY * max(gain, 1 / gain))
        self.steps_since_explore += 1
        if self.steps_since_explore >= every:
            self.steps_since_explore = 0
            return not choice
        return choice
