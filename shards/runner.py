"""Turn a `StepPlan` into one forward over the flat token batch, then sample.

Sequences running one token go first so attention can batch them; logits are computed only for
the last token of sequences that sample this step.
"""

from __future__ import annotations

import itertools
import time

import torch
from torch import nn

from layers.attention.metadata import AttentionMetadata, BatchLayout, positions_and_slots
from shards.compiled_decode import CompiledDecode
from shards.cuda_graphs import DecodeGraphs
from shards.kv_cache import KVCache
from shards.lookahead import accept_greedy, accept_sampled, move_kv
from shards.sampler import Sampler, SeqSamplingState, greedy_tokens, sampling_probs
from shards.wire import ScheduledSeq, SeqOutput, StepPlan, StepResult


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[KVCache],
        block_size: int,
        vocab_size: int,
        device: torch.device,
        seed: int | None = None,
        driver: bool = True,
        graphs: DecodeGraphs | None = None,
        compiled: CompiledDecode | None = None,
    ) -> None:
        # Only the driver (rank 0) samples and answers; other tensor-parallel ranks run the
        # same forward and join its collectives, including the LM head's gather.
        self.driver = driver
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = device
        self.graphs = graphs  # replays decode steps as CUDA graphs where they fit one
        self.compiled = compiled  # runs decode steps torch.compile'd (CPU) where they fit
        self.sampler = Sampler(vocab_size, device, seed)
        self.states: dict[int, SeqSamplingState] = {}

    def _update_states(self, plan: StepPlan) -> None:
        if not self.driver:
            return
        for seq_id in plan.finished_seq_ids:
            self.states.pop(seq_id, None)
        for new in plan.new_seqs:
            self.states[new.seq_id] = SeqSamplingState.create(
                new.sampling, new.prompt_token_ids, self.vocab_size, self.device
            )

    def forward(self, seqs: list[ScheduledSeq]) -> tuple[torch.Tensor, list[int]]:
        """Run the sequences' tokens (singles first) through the model, writing their K/V.
        Returns the hidden states [num_tokens, hidden] and the row of each sequence's last
        token."""
        if self.graphs is not None:
            hidden = self.graphs.run(seqs)
            if hidden is not None:
                return hidden, list(range(len(seqs)))
        trees = [s.draft_parents for s in seqs]
        layout = BatchLayout(
            query_lens=[len(s.token_ids) for s in seqs],
            start_positions=[s.start_pos for s in seqs],
            block_tables=[s.block_table for s in seqs],
            block_size=self.block_size,
            draft_parents=trees if any(t is not None for t in trees) else None,
        )
        positions, slots = positions_and_slots(layout)
        input_ids = [t for s in seqs for t in s.token_ids]
        dev = self.device
        seq_lens_per_token = None
        if getattr(self.model, "needs_seq_lens", False):
            seq_lens_per_token = _seq_len_per_token(layout, positions, dev)
        meta = AttentionMetadata(
            layout, torch.tensor(slots, dtype=torch.long, device=dev), seq_lens_per_token
        )
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            self.kv_caches,
            meta,
        )
        last_rows = list(itertools.accumulate(layout.query_lens))
        return hidden, [r - 1 for r in last_rows]

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        started = time.perf_counter()
        self._update_states(plan)
        move_kv(self.kv_caches, plan.kv_moves)  # before anything reads those slots
        if not plan.seqs:
            return StepResult(plan.step_id, [])
        seqs = sorted(plan.seqs, key=lambda s: len(s.token_ids) > 1)  # stable: singles first
        outputs: dict[int, SeqOutput] = {}
        logits = self.compiled.run(seqs) if self.compiled is not None else None
        if logits is not None:  # a decode step: one row per sequence
            rows = [i for i, s in enumerate(seqs) if s.sample]
            sampled = [seqs[i] for i in rows]
            if sampled:
                self._sample(logits if len(rows) == len(seqs) else logits[rows], sampled, outputs)
            ordered = [outputs[s.seq_id] for s in plan.seqs if s.seq_id in outputs]
            return StepResult(plan.step_id, ordered, time.perf_counter() - started)
        tree_logits = self.compiled.run_tree(seqs) if self.compiled is not None else None
        if tree_logits is not None:  # a compiled step scored every row
            last_rows = [r - 1 for r in itertools.accumulate(len(s.token_ids) for s in seqs)]
            self._sample_and_verify(seqs, last_rows, lambda rows: tree_logits[rows], outputs)
        else:
            hidden, last_rows = self.forward(seqs)
            self._sample_and_verify(
                seqs, last_rows, lambda rows: self.model.compute_logits(hidden[rows]), outputs
            )
            self._score_prompts(hidden, seqs, last_rows, outputs)
        ordered = [outputs[s.seq_id] for s in plan.seqs if s.seq_id in outputs]
        return StepResult(plan.step_id, ordered, time.perf_counter() - started)

    def _sample_and_verify(self, seqs, last_rows, logits_of, outputs) -> None:
        """Sample sequences that run plain tokens, verify draft trees; `logits_of(rows)` gives
        the logits of those rows of the step."""
        sampled = [s for s in seqs if s.sample and s.draft_parents is None]
        rows = [r for s, r in zip(seqs, last_rows) if s.sample and s.draft_parents is None]
        trees = [(s, r) for s, r in zip(seqs, last_rows) if s.draft_parents is not None]
        for s, last in trees:  # every node of a tree is scored
            rows += range(last - len(s.token_ids) + 1, last + 1)
        if not rows:
            return
        logits = logits_of(torch.tensor(rows, device=self.device))
        if self.driver:
            if sampled:
                self._sample(logits[: len(sampled)], sampled, outputs)
            self._verify(logits[len(sampled) :], [s for s, _ in trees], outputs)

    def _sample(self, logits, sampled: list[ScheduledSeq], outputs: dict[int, SeqOutput]) -> None:
        states = [self.states[s.seq_id] for s in sampled]
        out = self.sampler.sample(logits.float(), states)
        for i, (s, st) in enumerate(zip(sampled, states)):
            want = st.params.logprobs is not None
            outputs[s.seq_id] = SeqOutput(
                s.seq_id,
                [out.token_ids[i]],
                [out.logprobs[i]] if want else None,
                [out.top_logprobs[i]] if want and out.top_logprobs[i] is not None else None,
            )

    def _verify(self, logits, trees: list[ScheduledSeq], outputs: dict[int, SeqOutput]) -> None:
        """Verification of draft trees (greedy: argmax equality; sampled: speculative sampling):
        the accepted path and the tokens it yields, with logprobs read off the rows that chose
        them."""
        if not trees:
            return
        choices = greedy_tokens(logits).tolist()
        first = 0
        for s in trees:
            n = len(s.token_ids)
            state = self.states[s.seq_id]
            if state.params.greedy:
                path, tokens = accept_greedy(
                    choices[first : first + n], s.token_ids, s.draft_parents
                )
            else:
                probs = sampling_probs(logits[first : first + n].float(), [state.params] * n)
                gen = state.generator or self.sampler.generator
                path, tokens = accept_sampled(probs, s.token_ids, s.draft_parents, gen)
            out = outputs[s.seq_id] = SeqOutput(s.seq_id, tokens, accepted=path)
            k = state.params.logprobs
            if k is not None:
                at = torch.tensor([first + r for r in [0, *path]], device=logits.device)
                lp = logits[at].float().log_softmax(dim=-1)
                ids = torch.tensor(tokens, device=logits.device)
                out.logprobs = lp.gather(1, ids[:, None]).squeeze(1).tolist()
                if k > 0:
                    vals, top = lp.topk(k, dim=-1)
                    out.top_logprobs = [
                        list(zip(i, v)) for i, v in zip(top.tolist(), vals.tolist())
                    ]
            first += n

    def _score_prompts(self, hidden, seqs, last_rows, outputs: dict[int, SeqOutput]) -> None:
        """Logprobs of each prompt token given the ones before it, for sequences that ask."""
        for s, last in zip(seqs, last_rows):
            if not s.prompt_targets:
                continue
            first = last - len(s.token_ids) + 1
            rows = torch.arange(first, first + len(s.prompt_targets), device=self.device)
            logits = self.model.compute_logits(hidden[rows])
            if not self.driver:
                continue
            logprobs = logits.float().log_softmax(dim=-1)
            targets = torch.tensor(s.prompt_targets, device=self.device)
            out = outputs.setdefault(s.seq_id, SeqOutput(s.seq_id, []))
            out.prompt_logprobs = logprobs.gather(1, targets[:, None]).squeeze(1).tolist()
            k = self.states[s.seq_id].params.prompt_logprobs or 0
            if k > 0:
                vals, ids = logprobs.topk(k, dim=-1)
                out.prompt_top_logprobs = [
                    list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())
                ]


def _seq_len_per_token(layout: BatchLayout, positions: list[int], device) -> torch.Tensor:
    """The sequence length each token's rotary scaling sees: a chunk's whole length, or for a
    draft tree each token's own (its position + 1), as plain decoding would have seen it."""
    lens = []
    first = 0
    trees = layout.draft_parents or [None] * len(layout.query_lens)
    for n, total, tree in zip(layout.query_lens, layout.seq_lens, trees):
        lens += [p + 1 for p in positions[first : first + n]] if tree is not None else [total] * n
        first += n
    return torch.tensor(lens, device=device)
