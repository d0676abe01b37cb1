"""Token-budgeted continuous batching over plain data (no torch, no asyncio).

Each step, every scheduled sequence runs some number of its not-yet-computed tokens: one for a
decode, a chunk for a prompt. Order of service: running sequences that decode (so a long prompt
never starves them), then running sequences still in their prompt, then waiting sequences in
arrival order. The step's tokens never exceed `max_num_batched_tokens`; running sequences never
exceed `max_num_seqs`. When KV blocks run out, the newest running sequence is pre-empted: its
blocks are freed and it goes back to the head of the queue, to be recomputed (its full blocks
usually survive in the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from router.lookahead.drafter import Drafter, DraftTree
from router.scheduling.block_allocator import BlockAllocator
from router.scheduling.sequence import SeqStatus, Sequence, SeqUpdate
from shards.wire import NewSeq, ScheduledSeq, StepPlan, StepResult


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    eos_token_ids: tuple[int, ...] = ()
    # Free blocks admission leaves untouched so running decodes do not immediately pre-empt.
    watermark_blocks: int = 0


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, allocator: BlockAllocator, drafter: Drafter | None = None
    ) -> None:
        self.config = config
        self.allocator = allocator
        self.drafter = drafter  # lookahead: draft trees for decodes without penalties
        self._kv_moves: list[tuple[int, int]] = []  # to send with the next plan
        self.num_draft_proposed = 0
        self.num_draft_accepted = 0
        self.num_draft_steps = 0  # verifications: (sequence, step) pairs that carried a tree
        self.block_size = allocator.block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}
        self._finished_ids: list[int] = []  # to tell the shard, with the next plan
        self._step_id = 0
        self.num_preemptions = 0

    # -- requests ---------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if seq.num_tokens == 0:
            raise ValueError("a sequence needs at least one prompt token")
        if seq.num_tokens >= self.config.max_model_len:
            raise ValueError(
                f"prompt of {seq.num_tokens} tokens leaves no room under "
                f"max_model_len={self.config.max_model_len}"
            )
        seq.status = SeqStatus.WAITING
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def abort(self, seq_id: int, reason: str = "abort") -> Sequence | None:
        """Finish a sequence now (client gone, stop string found) and free its blocks; no-op
        for an unknown or finished id."""
        seq = self.seqs.get(seq_id)
        if seq is None or seq.is_finished:
            return None
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._finish(seq, reason)
        return seq

    def stop_after(self, u: SeqUpdate, taken: int) -> None:
        """A stop string ends the sequence after `taken` of this update's tokens: those after it
        never happened (with lookahead several arrive at once), as in plain decoding; its blocks
        are freed as by `abort` (reason "stop")."""
        extra = len(u.new_token_ids) - taken
        if extra > 0:
            del u.seq.token_ids[-extra:]
            u.new_token_ids = u.new_token_ids[:taken]
            if u.logprobs is not None:
                u.logprobs = u.logprobs[:taken]
            if u.top_logprobs is not None:
                u.top_logprobs = u.top_logprobs[:taken]
        self.abort(u.seq.seq_id, reason="stop")

    def wait_seconds(self) -> float | None:
        """How long the step loop may idle before this scheduler wants a step though nothing
        arrives (dynamic batching: a gathering batch falls due); None: until something does."""
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- planning ---------------------------------------------------------------------------

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_ids))

    def _fit(self, seq: Sequence, want: int) -> int:
        """Most of `want` tokens the free blocks can hold for `seq` (0 if not even one)."""
        room = (len(seq.block_ids) + self.allocator.num_free) * self.block_size - seq.num_computed
        return max(0, min(want, room))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed = 0
        seq.num_committed_blocks = 0
        seq.prompt_logprobs, seq.prompt_top_logprobs = [], []  # recomputed on resume
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _draft(self, seq: Sequence, budget: int, room: int, alone: bool) -> DraftTree | None:
        """A draft tree for a decode, within the step's token budget, the step's draft
        room, the request's remaining tokens and the context. alone: the step's only
        sequence (its tree step runs compiled, padded to a row count the tree may fill)."""
        if seq.params.sampling.has_penalties:
            return None  # a penalty would change each draft row's distribution by its path
        want = self.drafter.budget_for(seq.seq_id, seq.token_ids)
        k = min(
            self.drafter.fill_rows(want) if alone else want,
            room,
            budget - 1,
            seq.params.max_tokens - seq.num_output_tokens - 1,
            self.config.max_model_len - seq.num_tokens - 1,
        )
        return self.drafter.propose(seq.seq_id, seq.token_ids, k)

    def _draft_room(self, decoding: list[Sequence], with_prefill: bool) -> int:
        """Draft tokens this step may carry over all its decodes: none where trees have not
        been paying for themselves (router/lookahead/costs.py), and then the sequences draft
        shadow chains instead (router/lookahead/shadow_drafts.py)."""
        if self.drafter is None or not decoding:
            return 0
        context = sum(s.num_tokens for s in decoding) // len(decoding)
        if not self.drafter.drafts_pay(len(decoding), with_prefill, bool(self.waiting), context):
            self.drafter.shadow(
                [(s.seq_id, s.token_ids) for s in decoding if not s.params.sampling.has_penalties]
            )
            return 0
        return self.drafter.step_budget - len(decoding)

    def schedule(self) -> StepPlan | None:
        budget = self.config.max_num_batched_tokens
        chosen: dict[int, tuple[Sequence, int]] = {}
        drafts: dict[int, DraftTree] = {}
        preempted = False
        decoding = [s for s in self.running if s.num_tokens - s.num_computed == 1]
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed > 1]
        draft_room = self._draft_room(decoding, bool(prefilling))
        alone = len(decoding) == 1 and not prefilling
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # pre-empted earlier in this loop
            want = min(seq.num_tokens - seq.num_computed, budget)
            tree = (
                self._draft(seq, budget, draft_room, alone)
                if draft_room > 0 and want == 1
                else None
            )
            if tree is not None:
                n = self._fit(seq, 1 + len(tree))
                if n > 1:  # drafts take free room only; they never pre-empt
                    drafts[seq.seq_id] = DraftTree(tree.tokens[: n - 1], tree.parents[: n - 1])
                    want = n
                    draft_room -= n - 1
            n = self._fit(seq, want)
            while n == 0 and seq.status is SeqStatus.RUNNING:
                victim = self.running[-1]
                if victim.seq_id in chosen:
                    budget += chosen.pop(victim.seq_id)[1]
                self._preempt(victim)
                preempted = True
                n = self._fit(seq, want)
            if seq.status is not SeqStatus.RUNNING:
                continue
            seq.block_ids += self.allocator.allocate(self._blocks_needed(seq, n))
            chosen[seq.seq_id] = (seq, n)
            budget -= n
        if not preempted:
            budget = self._admit(chosen, budget)
        if not chosen:
            return self._empty_plan()
        drafts = {i: t for i, t in drafts.items() if i in chosen}  # its seq may be pre-empted
        return self._plan([s for s, _ in chosen.values()], [n for _, n in chosen.values()], drafts)

    def _admit(self, chosen: dict[int, tuple[Sequence, int]], budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            bs = self.block_size
            hashes = seq.full_block_hashes(bs)
            # At least one token must run to produce logits, so the last block is never a hit;
            # scoring the prompt needs the logits of every prompt position: no hits at all.
            scoring = seq.params.sampling.prompt_logprobs is not None
            usable = [] if scoring else hashes[: (seq.num_tokens - 1) // bs]
            hit = self.allocator.lookup(usable)
            num_computed = len(hit) * bs
            n = min(seq.num_tokens - num_computed, budget)
            new_blocks = -(-(num_computed + n) // bs) - len(hit)
            # With nothing running there is nothing to protect: the watermark would only block.
            free = self.allocator.num_free - (self.config.watermark_blocks if self.running else 0)
            if new_blocks + self.allocator.num_revived(hit) > free:
                break  # first come, first served: later arrivals wait behind it
            self.waiting.popleft()
            self.allocator.record_lookup(len(usable), len(hit))
            self.allocator.take(hit)
            seq.block_ids = hit + self.allocator.allocate(new_blocks)
            seq.num_computed = num_computed
            seq.num_committed_blocks = len(hit)
            if seq.num_preemptions == 0:
                seq.num_cached_prompt_tokens = num_computed
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            chosen[seq.seq_id] = (seq, n)
            budget -= n
        return budget

    def _plan(
        self, seqs: list[Sequence], counts: list[int], drafts: dict[int, DraftTree]
    ) -> StepPlan:
        self._step_id += 1
        scheduled = []
        new = []
        for seq, n in zip(seqs, counts):
            start = seq.num_computed
            tree = drafts.get(seq.seq_id)
            if tree is not None:
                scheduled.append(
                    ScheduledSeq(
                        seq.seq_id,
                        [seq.token_ids[start], *tree.tokens],
                        start,
                        list(seq.block_ids),
                        True,
                        draft_parents=list(tree.parents),
                    )
                )
                self._announce(seq, new)
                continue
            targets = None
            if (
                seq.params.sampling.prompt_logprobs is not None
                and start + 1 < seq.num_prompt_tokens
            ):
                targets = seq.token_ids[start + 1 : min(start + n + 1, seq.num_prompt_tokens)]
            scheduled.append(
                ScheduledSeq(
                    seq_id=seq.seq_id,
                    token_ids=seq.token_ids[start : start + n],
                    start_pos=start,
                    block_table=list(seq.block_ids),
                    sample=start + n == seq.num_tokens and seq.params.max_tokens > 0,
                    prompt_targets=targets,
                )
            )
            self._announce(seq, new)
        finished, self._finished_ids = self._finished_ids, []
        moves, self._kv_moves = self._kv_moves, []
        return StepPlan(self._step_id, scheduled, new, finished, moves)

    @staticmethod
    def _announce(seq: Sequence, new: list[NewSeq]) -> None:
        if not seq.announced:
            seq.announced = True
            sp = seq.params.sampling
            prompt = seq.prompt_token_ids if sp.repetition_penalty != 1.0 else []
            new.append(NewSeq(seq.seq_id, sp, list(prompt)))

    def _empty_plan(self) -> StepPlan | None:
        if not self._finished_ids and not self._kv_moves:
            return None
        self._step_id += 1
        finished, self._finished_ids = self._finished_ids, []
        moves, self._kv_moves = self._kv_moves, []
        return StepPlan(self._step_id, [], [], finished, moves)

    # -- results ----------------------------------------------------------------------------

    def update(
        self, plan: StepPlan, result: StepResult, step_seconds: float | None = None
    ) -> list[SeqUpdate]:
        """step_seconds: what the step took from planning to its result (drafting and
        transport included), for lookahead's costs; the shard's forward time if not given."""
        if self.drafter is not None:
            self.drafter.observe(plan, result, step_seconds or result.forward_seconds)
        outputs = {o.seq_id: o for o in result.outputs}
        updates = []
        for s in plan.seqs:
            seq = self.seqs.get(s.seq_id)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue  # aborted while the step ran
            if s.draft_parents is not None:
                updates.append(self._verified(seq, s, outputs[s.seq_id]))
                continue
            seq.num_computed += len(s.token_ids)
            self._commit_full_blocks(seq)
            out = outputs.get(s.seq_id)
            if out is not None and out.prompt_logprobs is not None:
                seq.prompt_logprobs += out.prompt_logprobs
                seq.prompt_top_logprobs += out.prompt_top_logprobs or []
            if seq.params.max_tokens == 0 and seq.num_computed == seq.num_tokens:
                self.running.remove(seq)  # a prompt scored, nothing to generate
                self._finish(seq, "length")
                updates.append(SeqUpdate(seq, []))
            elif out is not None and out.token_ids:
                updates.append(self._append(seq, out))
        return updates

    def _append(self, seq: Sequence, out) -> SeqUpdate:
        accepted = []
        for token in out.token_ids:
            seq.token_ids.append(token)
            accepted.append(token)
            reason = self._stop_reason(seq, token)
            if reason:
                seq.stopped_on_token = reason == "stop"
                self.running.remove(seq)
                self._finish(seq, reason)
                break
        n = len(accepted)
        return SeqUpdate(
            seq,
            accepted,
            out.logprobs[:n] if out.logprobs is not None else None,
            out.top_logprobs[:n] if out.top_logprobs is not None else None,
        )

    def _verified(self, seq: Sequence, s: ScheduledSeq, out) -> SeqUpdate:
        """A draft tree's result: the real token and the accepted draft path are computed;
        their K/V move into consecutive slots (with the next plan) where the path was not the
        tree's first branch; the rest of the tree's K/V is left to be overwritten."""
        path = out.accepted or []
        bs, table, start = self.block_size, s.block_table, s.start_pos
        for depth, node in enumerate(path, start=1):
            if node != depth:
                src, dst = start + node, start + depth
                self._kv_moves.append(
                    (table[src // bs] * bs + src % bs, table[dst // bs] * bs + dst % bs)
                )
        seq.num_computed += 1 + len(path)
        seq.num_draft_proposed += len(s.draft_parents)
        seq.num_draft_accepted += len(path)
        self.num_draft_proposed += len(s.draft_parents)
        self.num_draft_accepted += len(path)
        self.num_draft_steps += 1
        self.drafter.record(seq.seq_id, len(s.draft_parents), len(path))
        update = self._append(seq, out)
        if seq.status is SeqStatus.RUNNING:
            self._commit_full_blocks(seq)
        return update

    def _commit_full_blocks(self, seq: Sequence) -> None:
        full = seq.num_computed // self.block_size
        if full <= seq.num_committed_blocks:
            return
        hashes = seq.full_block_hashes(self.block_size)
        for i in range(seq.num_committed_blocks, full):
            self.allocator.commit(seq.block_ids[i], hashes[i])
        seq.num_committed_blocks = full

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.config.eos_token_ids):
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self.allocator.free(seq.block_ids)
        seq.block_ids = []
        del self.seqs[seq.seq_id]
        if seq.announced:
            self._finished_ids.append(seq.seq_id)
        if self.drafter is not None:
            self.drafter.forget(seq.seq_id, seq.output_token_ids)
