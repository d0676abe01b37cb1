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
the costs and the gain stay measured as contexts grow and the text changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# One decode step in this many explores the choice not taken; a step with trees that costs k
# plain ones explores k times as rarely, so exploring never costs more than ~1/16 of the time.
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

    def observe(self, num_seqs: int, accepted: int | None, seconds: float) -> None:
        """A decode-only step (each sequence ran one token or one tree), the draft tokens it
        got accepted (None: it carried no trees) and its time."""
        if seconds <= 0 or num_seqs == 0:
            return
        key = batch_bucket(num_seqs)
        if accepted is None:
            _average(self.plain, key, seconds)
        else:
            _average(self.tree, key, seconds)
            _average(self.accepted, key, accepted / num_seqs)  # per sequence: buckets mix n

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
            choice = (1 + self.accepted[key]) * plain > tree
            if not choice:
                every = round(EXPLORE_EVERY * max(1.0, tree / plain))
        self.steps_since_explore += 1
        if self.steps_since_explore >= every:
            self.steps_since_explore = 0
            return not choice
        return choice
