"""Shadow chains: drafts a sequence makes in steps that give it no tree, never verified, and
checked against the tokens the following steps produce. What they get right is what a tree
would have got accepted, measured at no cost: the cost gate (router/lookahead/costs.py) and a
sequence's own acceptance average (router/lookahead/drafter.py) learn from them when trees pay
again, rather than from trees run on the chance that they might.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ShadowChain:
    tokens: list[int]
    at: int  # the sequence's length when drafted: tokens[0] guesses its token `at`


@dataclass
class ShadowChains:
    """One sequence's unsettled chains (at most one drafted a step, each settled within its
    length)."""

    pending: list[ShadowChain] = field(default_factory=list)

    def add(self, tokens: list[int], at: int) -> None:
        self.pending.append(ShadowChain(tokens, at))

    def settle(self, sequence: list[int]) -> list[int]:
        """The tokens right of each chain the sequence's tokens now settle, by a wrong token
        or by reaching the chain's end; the others stay pending."""
        settled, pending = [], []
        for c in self.pending:
            came = sequence[c.at : c.at + len(c.tokens)]
            wrong = next((i for i, (a, b) in enumerate(zip(came, c.tokens)) if a != b), None)
            if wrong is None and len(came) < len(c.tokens):
                pending.append(c)
            else:
                settled.append(len(came) if wrong is None else wrong)
        self.pending = pending
        return settled

    def clear(self) -> None:
        self.pending = []
