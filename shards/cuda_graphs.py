"""CUDA graphs for decode steps: one graph per (padded batch size, padded block-table width),
recorded on first use and replayed after. A replay launches a whole forward's kernels at once,
which removes the host's per-kernel cost: most of a small model's decode step (BENCHMARKS.md).

Only steps where every sequence runs one token qualify; others run eagerly. Padding rows use
token 0 at position 0 and read and write only the null block 0, so they touch no sequence's KV.
The LM head and sampling stay outside the graph (which rows sample changes every step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from layers.attention.metadata import AttentionMetadata, BatchLayout
from shards.kv_cache import KVCache
from shards.wire import ScheduledSeq

log = logging.getLogger("shardserve.cuda_graphs")

# Padded batch sizes: a step of n sequences replays the graph of the next size up.
BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # [3, batch] int64: token ids, positions, KV slots
    block_ids: torch.Tensor  # [batch, max_blocks] int64
    hidden: torch.Tensor  # [batch, hidden_size]: where each replay leaves its output
    meta: AttentionMetadata  # the graph reads the tensors it holds


class DecodeGraphs:
    def __init__(
        self, model: nn.Module, kv_caches: list[KVCache], block_size: int, max_model_len: int
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.device = kv_caches[0][0].device
        self.pool = torch.cuda.graph_pool_handle()  # graphs replay one at a time: share memory
        self.graphs: dict[tuple[int, int], _Graph] = {}

    def run(self, seqs: list[ScheduledSeq]) -> torch.Tensor | None:
        """The hidden states [len(seqs), hidden] of a decode step, or None if the step does not
        fit a graph. The result is overwritten by the next replay."""
        n = len(seqs)
        if n > BATCH_SIZES[-1] or any(len(s.token_ids) != 1 for s in seqs):
            return None
        batch = next(b for b in BATCH_SIZES if b >= n)
        width = max(len(s.block_table) for s in seqs)
        # Widths round up to powers of two: few graphs, at most twice the keys gathered.
        width = min(1 << (width - 1).bit_length(), max(self.max_blocks, width))
        g = self.graphs.get((batch, width))
        if g is None:
            g = self.graphs[(batch, width)] = self._record(batch, width)
        bs = self.block_size
        pad = batch - n
        inputs = [
            [s.token_ids[0] for s in seqs] + [0] * pad,
            [s.start_pos for s in seqs] + [0] * pad,
            [s.block_table[s.start_pos // bs] * bs + s.start_pos % bs for s in seqs] + [0] * pad,
        ]
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        g.inputs.copy_(torch.tensor(inputs, dtype=torch.long))
        g.block_ids.copy_(torch.tensor(tables + [[0] * width] * pad, dtype=torch.long))
        g.graph.replay()
        return g.hidden[:n]

    def _record(self, batch: int, width: int) -> _Graph:
        dev = self.device
        inputs = torch.zeros(3, batch, dtype=torch.long, device=dev)
        block_ids = torch.zeros(batch, width, dtype=torch.long, device=dev)
        layout = BatchLayout([1] * batch, [0] * batch, [[0] * width] * batch, self.block_size)
        meta = AttentionMetadata(layout, inputs[2], None, decode_inputs=(block_ids, inputs[1]))
        # A first run outside the graph lets cuBLAS and cuDNN choose and load their kernels;
        # the masks it leaves in meta.cache are dropped so the graph records computing them.
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            self.model(inputs[0], inputs[1], self.kv_caches, meta)
        torch.cuda.current_stream(dev).wait_stream(side)
        meta.cache.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = self.model(inputs[0], inputs[1], self.kv_caches, meta)
        log.info("recorded a decode graph for %d sequences x %d KV blocks", batch, width)
        return _Graph(graph, inputs, block_ids, hidden, meta)
