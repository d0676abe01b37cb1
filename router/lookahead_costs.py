"""Whether draft trees pay, measured: lookahead drafts only where they have been giving more
tokens per second than plain decoding.

A decode step that carries trees runs more rows, and on CPU it also runs eagerly where a plain
decode step runs compiled (shards/compiled_decode.py): there it can cost 2-3x a plain step,
and drafts accepted less often than that make decoding slower. So every decode-only step's
tokens and forward time go into running averages per batch size (powers of two), one pair for
plain steps and one for steps with trees; a step drafts when trees have been the faster of the
two at its batch size. Now and then a step takes the other choice, so both stay measured as
contexts grow and the text changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Every this many decode steps one explores the choice not taken; four times as rarely where it
# has been losing by more than half (a tree step can cost three plain ones).
EXPLORE_EVERY = 16
CLEAR_LOSS = 1.5
_SMOOTHING = 0.2  # weight of the newest step in each average


def batch_bucket(num_seqs: int) -> int:
    return 1 << max(num_seqs - 1, 0).bit_length()


@dataclass
class _Rate:
    tokens: float
    seconds: float

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += _SMOOTHING * (tokens - self.tokens)
        self.seconds += _SMOOTHING * (seconds - self.seconds)

    @property
    def per_second(self) -> float:
        return self.tokens / self.seconds


@dataclass
class StepCosts:
    plain: dict[int, _Rate] = field(default_factory=dict)  # batch bucket -> its average
    tree: dict[int, _Rate] = field(default_factory=dict)
    steps_since_explore: int = 0

    def observe(self, num_seqs: int, has_trees: bool, tokens: int, seconds: float) -> None:
        """A decode-only step (each sequence ran one token or one tree): the tokens it gave
        and its forward time."""
        if seconds <= 0 or num_seqs == 0:
            return
        rates = self.tree if has_trees else self.plain
        key = batch_bucket(num_seqs)
        if key in rates:
            rates[key].add(tokens, seconds)
        else:
            rates[key] = _Rate(tokens, seconds)

    def worth_drafting(self, num_decodes: int) -> bool:
        """Whether a decode step of this many sequences should carry trees."""
        key = batch_bucket(num_decodes)
        plain, tree = self.plain.get(key), self.tree.get(key)
        every = EXPLORE_EVERY
        if plain is None or tree is None:
            choice = tree is None  # measure whichever is unknown first
        else:
            choice = tree.per_second > plain.per_second
            faster, slower = sorted((tree.per_second, plain.per_second), reverse=True)
            if faster > CLEAR_LOSS * slower:
                every *= 4
        self.steps_since_explore += 1
        if self.steps_since_explore >= every:
            self.steps_since_explore = 0
            return not choice
        return choice
