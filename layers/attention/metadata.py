"""The shape of one step's flat batch, shared by every attention backend.

Sequences appear in the flat token batch in `BatchLayout` order, and sequences that run a single
token (decodes, last prompt tokens) come first so a backend can treat them as one batched query.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from layers.attention.tree import tree_depths


@dataclass
class BatchLayout:
    query_lens: list[int]  # tokens each sequence runs this step
    start_positions: list[int]  # position of each sequence's first token == cached tokens
    block_tables: list[list[int]]  # KV block ids covering start + query_len tokens
    block_size: int
    # Lookahead: per sequence, the parents of its draft tokens (shards/lookahead.py), or None.
    # A tree's token i is written to slot start + i but sits at position start + depth(i).
    draft_parents: list[list[int] | None] | None = None

    def __post_init__(self) -> None:
        n = len(self.query_lens)
        assert len(self.start_positions) == n and len(self.block_tables) == n
        self.num_single = 0
        for q in self.query_lens:
            if q != 1:
                break
            self.num_single += 1
        assert all(q > 1 for q in self.query_lens[self.num_single :]), "single-token seqs go first"

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def seq_lens(self) -> list[int]:
        return [s + q for s, q in zip(self.start_positions, self.query_lens)]


def positions_and_slots(layout: BatchLayout) -> tuple[list[int], list[int]]:
    """Each token's position and the flat cache slot its K/V are written to."""
    bs = layout.block_size
    positions: list[int] = []
    slots: list[int] = []
    trees = layout.draft_parents or [None] * len(layout.query_lens)
    for start, n, table, tree in zip(
        layout.start_positions, layout.query_lens, layout.block_tables, trees
    ):
        if tree is not None:
            positions.extend(start + d for d in tree_depths(tree))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            continue
        if n == 1:
            positions.append(start)
            slots.append(table[start // bs] * bs + start % bs)
            continue
        rng = range(start, start + n)
        positions.extend(rng)
        slots.extend(table[p // bs] * bs + p % bs for p in rng)
    return positions, slots


@dataclass
class AttentionMetadata:
    """Tensors every layer reuses; backends add their own derived tensors in `cache`."""

    layout: BatchLayout
    slot_mapping: torch.Tensor  # [num_tokens] int64
    seq_lens_per_token: torch.Tensor | None  # [num_tokens], only when the rotary needs it
    cache: dict = field(default_factory=dict)
    # Single-token sequences' block ids [num_single, max_blocks] (padded with the null block)
    # and positions [num_single]; built from the layout when None. A CUDA graph passes its
    # static buffers here, so the masks derived from them are part of what it records.
    decode_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
    # A compiled step whose rows are one sequence's lookahead tree nodes: which cache slots each
    # row attends to, [rows, max_blocks, block_size] bool (paged_decode.shared_tree_attention).
    decode_mask: torch.Tensor | None = None
