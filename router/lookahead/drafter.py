"""Lookahead drafts: guesses of a sequence's next tokens from text already seen, as a tree.

Each sequence keeps an n-gram index of its own tokens (prompt and output): for every n-gram of
1..`max_ngram` tokens, the positions that followed it. A draft looks up the sequence's last
tokens, longest match first, and takes the continuations after each earlier occurrence (most
recent first) as branches; a whitespace-insensitive match finds quotes whose lines the model
re-wrapped (router/lookahead/ngrams.py). A shared pool of recently generated text adds branches
across requests. Branches merge into a tree by common prefix; the tree is laid out depth-first with
the most likely branch first, so when that branch is accepted its K/V already sit in order.

The tree travels as tokens plus parent indices: node 0 is the sequence's last real token, node
i > 0 a draft token whose parent is `parents[i - 1]` (< i).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from router.lookahead.costs import StepCosts
from router.lookahead.ngrams import NgramIndex, SharedNgrams, TokenKeys
from router.lookahead.shadow_drafts import ShadowChains
from shards.wire import ShardInfo, StepPlan, StepResult


@dataclass
class DraftTree:
    tokens: list[int]  # draft tokens, depth-first; parents[i] indexes [root] + tokens
    parents: list[int]

    def __len__(self) -> int:
        return len(self.tokens)


def build_tree(runs: list[list[int]], budget: int) -> DraftTree:
    """Merge runs (best first) into a prefix tree of at most `budget` nodes, depth-first with
    each node's children in the order their runs came."""
    children: dict[int, list[int]] = {0: []}  # node -> child nodes; 0 is the root
    token_of = [-1]
    parent_of = [-1]
    for run in runs:
        node = 0
        for t in run:
            nxt = next((c for c in children[node] if token_of[c] == t), None)
            if nxt is None:
                if len(token_of) - 1 >= budget:
                    break
                nxt = len(token_of)
                token_of.append(t)
                parent_of.append(node)
                children[node].append(nxt)
                children[nxt] = []
            node = nxt
    # re-number depth-first so the first run's nodes are 1..len(first run)
    order: list[int] = []
    stack = list(reversed(children[0]))
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(reversed(children[n]))
    new_index = {0: 0} | {n: i + 1 for i, n in enumerate(order)}
    return DraftTree(
        tokens=[token_of[n] for n in order], parents=[new_index[parent_of[n]] for n in order]
    )


# A sequence that has been accepting nothing drafts shadow chains of this many tokens: what a
# tree would give it once it accepts again.
RESUME_BUDGET = 4


@dataclass
class SeqDraftState:
    index: NgramIndex
    # Mean accepted draft tokens per verified step, smoothed; starts hopeful so a sequence
    # gets to show what it accepts.
    accepted_ema: float = 2.0
    proposed: int = 0
    accepted: int = 0
    # Drafts of steps that gave it no tree (the cost gate said no, or it has been accepting
    # nothing), checked against what it produces next (router/lookahead/shadow_drafts.py)
    shadows: ShadowChains = field(default_factory=ShadowChains)


@dataclass
class Drafter:
    """Draft trees for decoding sequences, sized by each one's measured acceptance."""

    max_depth: int = 8  # NUM_SPECULATIVE_TOKENS: the deepest guess
    # Wider trees rarely paid here: a second branch helps a little, more cost more to verify
    # than they add (BENCHMARKS.md)
    max_branches: int = 2
    max_ngram: int = 4
    # Draft tokens per step over all sequences: past this, a step is compute-bound and
    # verifying guesses costs more than it saves.
    step_budget: int = 32
    states: dict[int, SeqDraftState] = field(default_factory=dict)
    shared: SharedNgrams | None = None
    costs: StepCosts = field(default_factory=StepCosts)
    # False: every step drafts, whatever trees cost (tests of verification itself)
    gate_on_cost: bool = True
    # Row counts the shard pads one sequence's tree step to (ShardInfo.tree_rows): the rows
    # up to the next of them cost the same whether they hold draft tokens or padding.
    tree_rows: tuple[int, ...] = ()
    # The tokenizer's whitespace-stripped texts (router/lookahead/ngrams.py), or None: raw
    # n-grams only
    keys: TokenKeys | None = None

    def __post_init__(self) -> None:
        if self.shared is None:
            self.shared = SharedNgrams(self.max_ngram, self.max_depth)

    def _state(self, seq_id: int) -> SeqDraftState:
        st = self.states.get(seq_id)
        if st is None:
            st = self.states[seq_id] = SeqDraftState(NgramIndex(self.max_ngram, self.keys))
        return st

    def track(self, seq_id: int, tokens: list[int]) -> None:
        st = self._state(seq_id)
        # A pre-empted sequence keeps its tokens; only new ones are indexed
        new = tokens[len(st.index.tokens) :]
        if new:
            st.index.extend(new)

    def shadow(self, decoding: list[tuple[int, list[int]]]) -> None:
        """A decode step whose sequences carry no trees because trees have not been paying
        (`drafts_pay`): each (seq_id, tokens) drafts a shadow chain of the share of the
        step's draft room a step with trees would give it, and the chains that settle go
        into the costs' acceptance average, one observation a step as a step with trees
        makes. Without this the gate learns that trees pay again (the model went back to
        quoting) only from an exploring step."""
        room = max(self.step_budget - len(decoding), 0)
        got = []
        for seq_id, tokens in decoding:
            self.track(seq_id, tokens)
            st = self.states[seq_id]
            got += st.shadows.settle(tokens)
            share = min(self._want(st), room)
            room -= share
            if not self._draft_shadow(st, tokens, share):
                got.append(0)  # a tree step would get nothing from it either
        context = sum(len(t) for _, t in decoding) // max(len(decoding), 1)
        self.costs.observe_shadow(len(decoding), got, context)

    def _draft_shadow(self, st: SeqDraftState, tokens: list[int], share: int) -> bool:
        # as deep as a tree would be: shorter chains would settle sooner but undercount what
        # trees get where the model quotes (two-token chains kept the gate from the trees
        # that paid in bench-lookahead's mixed load); no deeper than the share, so what a
        # chain gets right is within what the step's draft room would have given it
        depth = min(share, self.max_depth)
        runs = st.index.continuations(depth, 1) if depth > 0 else []
        if runs:
            st.shadows.add(runs[0], len(tokens))
        return bool(runs)

    def forget(self, seq_id: int, output_tokens: list[int]) -> None:
        self.states.pop(seq_id, None)
        if output_tokens:
            self.shared.add(output_tokens)

    def budget_for(self, seq_id: int, tokens: list[int]) -> int:
        """Tokens to draft for this sequence now: four per token it has been accepting, plus
        four (verifying 5-20 tokens costs a CPU decode step 1.1-1.7x, BENCHMARKS.md). A
        sequence that has been accepting nothing drafts no tree, only shadow chains, and
        what they get right goes into its average: it drafts again as soon as the model
        repeats text again."""
        st = self._state(seq_id)
        if st.accepted_ema < 0.1:
            self.track(seq_id, tokens)
            for right in st.shadows.settle(tokens):
                st.accepted_ema = 0.7 * st.accepted_ema + 0.3 * right
            if st.accepted_ema < 0.1:
                self._draft_shadow(st, tokens, RESUME_BUDGET)
                return 0
        return self._want(st)

    def _want(self, st: SeqDraftState) -> int:
        if st.accepted_ema < 0.1:
            return 0
        return max(1, min(self.max_depth * self.max_branches, round(4 * st.accepted_ema) + 4))

    def fill_rows(self, want: int) -> int:
        """Draft tokens for a step in which one sequence verifies its tree, given the `want`
        its acceptance asks for: the tree and its root row fill one of the padded row counts
        up to the one nearest `want` (within what `max_depth` deep branches can hold), the
        one whose steps have been giving the most tokens per second (lookahead_costs.py)."""
        if want <= 0 or not self.tree_rows:
            return want
        rows = [r for r in self.tree_rows if r - 1 <= self.max_depth * self.max_branches]
        if not rows:
            return want
        nearest = min(rows, key=lambda r: (abs(r - 1 - want), r))
        return self.costs.best_rows([r for r in rows if r <= nearest]) - 1

    def propose(self, seq_id: int, tokens: list[int], budget: int) -> DraftTree | None:
        if budget <= 0:
            return None
        self.track(seq_id, tokens)
        st = self.states[seq_id]
        st.shadows.clear()  # a real tree's acceptance is measured now
        depth = min(self.max_depth, budget)
        branches = max(self.max_branches, -(-budget // depth))
        runs = st.index.continuations(depth, branches)
        if len(runs) < branches:
            shared = self.shared.continuation(tokens)
            if shared:
                runs.append(shared[:depth])
        if not runs:
            return None
        tree = build_tree(runs, budget)
        return tree if tree.tokens else None

    @staticmethod
    def for_shard(depth: int, info: ShardInfo, keys: TokenKeys | None = None) -> Drafter:
        """flash-attn's kernels take causal masks only: there drafts are single chains, whose
        tree mask is the causal one."""
        chains = info.attention_backend == "flash-attn"
        return Drafter(
            max_depth=depth,
            max_branches=1 if chains else 2,
            tree_rows=info.tree_rows,
            keys=keys,
        )

    def drafts_pay(
        self, num_decodes: int, with_prefill: bool, queued: bool = False, context: int = 0
    ) -> bool:
        """Whether this step's decodes (of this mean length) should carry trees
        (lookahead_costs.py; `queued`: requests wait for a place). A step that also runs
        prompt chunks runs eagerly anyway: there trees only add their rows."""
        if not self.gate_on_cost or with_prefill:
            return True
        return self.costs.worth_drafting(num_decodes, queued, context)

    def observe(self, plan: StepPlan, result: StepResult, seconds: float) -> None:
        """A finished step and the seconds it took, if it was decode-only."""
        if not plan.seqs:
            return
        trees = False
        for s in plan.seqs:
            if s.draft_parents is not None:
                trees = True
            elif len(s.token_ids) > 1:
                return  # a prompt chunk: not a decode-only step
        accepted = [len(o.accepted or ()) for o in result.outputs] if trees else None
        padded = None
        if trees and len(plan.seqs) == 1:
            rows = len(plan.seqs[0].token_ids)
            padded = next((r for r in self.tree_rows if r >= rows), None)
            path = result.outputs[0].accepted or []
            for smaller in self.tree_rows:
                if smaller < rows:
                    # The tree's first `smaller - 1` nodes (depth-first) are a tree of that
                    # size; what it would have got accepted is the path's part within them.
                    # So the smaller sizes are measured on the same text as the size run.
                    within = next((i for i, n in enumerate(path) if n >= smaller), len(path))
                    self.costs.observe_rows_accepted(smaller, within)
        context = sum(s.start_pos for s in plan.seqs) // len(plan.seqs) + 1
        self.costs.observe(len(plan.seqs), accepted, seconds, padded, context)

    def record(self, seq_id: int, proposed: int, accepted: int) -> None:
        st = self.states.get(seq_id)
        if st is None:
            return
        st.proposed += proposed
        st.accepted += accepted
        st.accepted_ema = 0.7 * st.accepted_ema + 0.3 * accepted
