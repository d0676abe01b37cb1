"""Compiled decode steps on CPU: what CUDA graphs (shards/cuda_graphs.py) are on a GPU.

A step in which every sequence runs one token is padded to the next of BATCH_SIZES and runs each
decoder layer through one torch.compile'd layer step of that size, shared by all layers (their
weights are its inputs), then the LM head through a compiled head step. Inductor fuses a
layer's small ops (norms, rotary, residual adds, KV writes) into a few C++ loops, streams int8
weights as int8 (`fused_gemv`, layers/quant/base.py) and attends over the paged cache in place
(layers/attention/paged_decode.py). The block-table width is a dynamic dimension, so one
compile per batch size covers every context length.

Padding rows are token 0 at position 0 in the null block 0: they touch no sequence's KV.

With lookahead, a step in which one sequence verifies a draft tree runs the same way, one row
per tree node (its own position and cache slot), padded to the next of TREE_ROWS, with an
explicit attention mask as input (each node sees the cache before its tree and its ancestors)
and the sequence's K/V read once for all rows (`shared_tree_attention`); it compiles graphs of
its own. Other steps (prefill chunks, several trees, prompt scoring) run eagerly.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from layers.attention.metadata import AttentionMetadata, BatchLayout
from layers.attention.tree import tree_depths, tree_mask
from shards.compile_cache import DirectCalls
from shards.kv_cache import KVCache
from shards.wire import ScheduledSeq

log = logging.getLogger("shardserve.compiled_decode")

# Padded batch sizes: a step of n sequences runs the compiled step of the next size up.
BATCH_SIZES = (1, 2, 4, 8, 16)

# Padded row counts of steps verifying a lookahead tree; the drafter sizes a lone sequence's
# tree to fill one (router/lookahead/drafter.py: fill_rows), 32 only where two branches can hold 31
# tokens (NUM_SPECULATIVE_TOKENS >= 16). Larger trees run eagerly.
TREE_ROWS = (8, 16, 32)

# Quantization modes whose decode matmuls compile: every mode, since fp8 and nf4 read their
# codes inside `fused_gemv` there (eagerly they rebuild float weights every step).
COMPILED_MODES = ("none", "ifq", "smoothquant", "fp8", "ifq_nf4")


def _logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.compute_logits(hidden)


def _logits_key(model, hidden):
    return hidden.shape[0]


def _layer_key(layer, rope, cos, sin, h, residual, kv_cache, slots, block_ids, positions, mask):
    # everything else a step passes is fixed by the model and its cache (block_ids' and the
    # mask's width are dynamic dimensions)
    return h.shape[0], residual is None, mask is None


def _decode_layer(
    layer, rope, cos, sin, h, residual, kv_cache, slots, block_ids, positions, mask=None
):
    # The layout is built inside the compiled function, so its guards check tensors only (a
    # layout passed in would be guarded entry by entry, on every layer of every step).
    n = h.shape[0]
    layout = BatchLayout([1] * n, [0] * n, [[0]] * n, kv_cache[0].shape[1])
    meta = AttentionMetadata(
        layout, slots, None, decode_inputs=(block_ids, positions), decode_mask=mask
    )
    return layer(rope, cos, sin, h, residual, kv_cache, meta)


class CompiledDecode:
    def __init__(
        self, model: nn.Module, kv_caches: list[KVCache], block_size: int, trees: bool = False
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        # Each batch size compiles the layer step twice (the first layer has no residual yet)
        # and the head once; the default limit of 8 graphs per function would be reached.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # The decoder stack every family builds on (shards/models/llama.py: LlamaModel).
        stack = model.model
        # id(layer) -> its compiled step, with the rotary it is given; layers described alike
        # share one
        steps: dict[int, DirectCalls] = {}  # id of the shared compiled function -> its calls
        self.compiled_layers = {}
        for layer in stack.layers:
            step = DirectCalls(_decode_layer, layer, stack.rotary_emb, key=_layer_key)
            self.compiled_layers[id(layer)] = steps.setdefault(id(step.compiled), step)
        self.compiled_head = DirectCalls(_logits, model, key=_logits_key)
        # Tree steps take their windows and biases from the mask and the rows' positions: a
        # sliding window (some families' per layer) or ALiBi (distances by depth) stays eager.
        cfg = getattr(model, "cfg", None)
        plain = cfg is not None and not any(cfg.sliding_windows) and not cfg.alibi
        self.tree_rows = TREE_ROWS if trees and plain else ()
        self.layouts = {
            b: BatchLayout([1] * b, [0] * b, [[0]] * b, block_size)
            for b in set(BATCH_SIZES) | set(self.tree_rows)
        }
        self.ready: set[tuple[int, bool]] = set()  # (rows, with a tree mask) compiled
        self.failed: str | None = None  # why compiling failed; every step then runs eagerly

    def fits(self, seqs: list[ScheduledSeq]) -> bool:
        return (
            self.failed is None
            and len(seqs) <= BATCH_SIZES[-1]
            and all(len(s.token_ids) == 1 and not s.prompt_targets for s in seqs)
        )

    def run(self, seqs: list[ScheduledSeq]) -> torch.Tensor | None:
        """The logits [len(seqs), vocab] of a decode step, or None if it does not fit one."""
        if not seqs or not self.fits(seqs):
            return None
        n = len(seqs)
        batch = next(b for b in BATCH_SIZES if b >= n)
        pad = batch - n
        bs = self.block_size
        # A width of 1 would be specialized by the compiler rather than kept dynamic.
        width = max(2, max(len(s.block_table) for s in seqs))
        ids = [s.token_ids[0] for s in seqs] + [0] * pad
        positions = [s.start_pos for s in seqs] + [0] * pad
        slots = [s.block_table[s.start_pos // bs] * bs + s.start_pos % bs for s in seqs]
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        logits = self._step(
            batch,
            torch.tensor(ids),
            torch.tensor(positions),
            torch.tensor(slots + [0] * pad),
            torch.tensor(tables + [[0] * width] * pad),
        )
        return None if logits is None else logits[:n]

    def usable_tree_rows(self) -> tuple[int, ...]:
        return () if self.failed is not None else self.tree_rows

    def fits_tree(self, seqs: list[ScheduledSeq]) -> bool:
        """One sequence verifying a tree (several would each read their whole context once per
        row of their tree in the row-wise attention; those steps run eagerly)."""
        return (
            self.failed is None
            and bool(self.tree_rows)
            and len(seqs) == 1
            and seqs[0].draft_parents is not None
            and not seqs[0].prompt_targets
            and len(seqs[0].token_ids) <= self.tree_rows[-1]
        )

    def run_tree(self, seqs: list[ScheduledSeq]) -> torch.Tensor | None:
        """The logits [rows, vocab] of every node of a step in which one sequence verifies a
        draft tree (in the tree's order), or None if the step does not fit a compiled one."""
        if not seqs or not self.fits_tree(seqs):
            return None
        (s,) = seqs
        rows, start, bs = len(s.token_ids), s.start_pos, self.block_size
        batch = next(b for b in self.tree_rows if b >= rows)
        width = max(2, len(s.block_table))
        positions = [start + depth for depth in tree_depths(s.draft_parents)]
        # node i lies in slot start + i; padding rows write to the null slot and read one slot
        slots = [s.block_table[(start + i) // bs] * bs + (start + i) % bs for i in range(rows)]
        mask = torch.zeros(batch, width * bs, dtype=torch.bool)
        mask[:rows, : start + rows] = tree_mask(s.draft_parents, start, None, "cpu")
        mask[rows:, 0] = True
        pad = batch - rows
        logits = self._step(
            batch,
            torch.tensor(s.token_ids + [0] * pad),
            torch.tensor(positions + [0] * pad),
            torch.tensor(slots + [0] * pad),
            torch.tensor([s.block_table + [0] * (width - len(s.block_table))]),  # shared
            mask.view(batch, width, bs),
        )
        return None if logits is None else logits[:rows]

    @torch.inference_mode()  # as steps run (shards/runner.py): grad mode is part of a graph
    def warm_up(self) -> None:
        """Compile every batch size now, on padding-only steps, so no request waits for it."""
        started = time.perf_counter()
        shapes = [(b, False) for b in BATCH_SIZES] + [(b, True) for b in self.tree_rows]
        for i, (b, tree) in enumerate(shapes):
            t = time.perf_counter()
            # Distinct tensors, as in a real step: a graph traced with two inputs that are one
            # tensor would be guarded on that and traced again for real steps.
            ids, positions, slots = (torch.zeros(b, dtype=torch.long) for _ in range(3))
            block_ids = torch.zeros(1 if tree else b, 2, dtype=torch.long)
            mask = torch.ones(b, 2, self.block_size, dtype=torch.bool) if tree else None
            if self._step(b, ids, positions, slots, block_ids, mask) is None:
                return
            log.info(
                "compiled decode step %d/%d (%d %s) in %.1fs",
                i + 1,
                len(shapes),
                b,
                "tree rows" if tree else "sequences",
                time.perf_counter() - t,
            )
        log.info("decode steps compiled in %.1fs", time.perf_counter() - started)

    def layer_step(self, layer, rope, cos, sin, h, residual, kv_cache, meta):
        """`call_layer`'s signature (shards/models/base.py), run compiled."""
        block_ids, positions = meta.decode_inputs
        return self.compiled_layers[id(layer)](
            layer,
            rope,
            cos,
            sin,
            h,
            residual,
            kv_cache,
            meta.slot_mapping,
            block_ids,
            positions,
            meta.decode_mask,
        )

    def _step(self, batch, ids, positions, slots, block_ids, mask=None) -> torch.Tensor | None:
        torch._dynamo.mark_dynamic(block_ids, 1)
        if mask is not None:
            torch._dynamo.mark_dynamic(mask, 1)
        meta = AttentionMetadata(
            self.layouts[batch], slots, None, decode_inputs=(block_ids, positions), decode_mask=mask
        )
        key = (batch, mask is not None)
        if key in self.ready:
            hidden = self.model(ids, positions, self.kv_caches, meta, layer_step=self.layer_step)
            return self.compiled_head(self.model, hidden)
        try:  # the first call compiles: a machine without a C++ compiler fails here
            hidden = self.model(ids, positions, self.kv_caches, meta, layer_step=self.layer_step)
            logits = self.compiled_head(self.model, hidden)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("compiling decode steps failed (%s); they run eagerly", self.failed)
            return None
        self.ready.add(key)
        return logits
