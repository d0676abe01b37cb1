"""Paged KV cache tensors and how many blocks fit in the memory budget.

Layout per layer: K and V each [num_blocks, block_size, local_kv_heads, head_dim] (the layout
flash-attn's paged kernels read). Block 0 is the null block: never handed out by the router,
it pads block tables and absorbs writes of padding tokens.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("shardserve.kv_cache")

KVCache = tuple[torch.Tensor, torch.Tensor]


class KVCacheError(ValueError):
    pass


def block_bytes(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * kv_heads * head_dim * elem


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (what the kernel can give without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def cpu_num_blocks(budget_bytes: int, one_block_bytes: int) -> int:
    # Leave a tenth of the free memory for activations, the router and the OS.
    limit = int(available_memory_bytes() * 0.9)
    if budget_bytes > limit:
        log.warning(
            "kv cache budget %.2f GiB exceeds the %.2f GiB this machine can spare; using %.2f GiB",
            budget_bytes / 2**30,
            limit / 2**30,
            limit / 2**30,
        )
        budget_bytes = limit
    return budget_bytes // one_block_bytes


def check_capacity(num_blocks: int, block_size: int, max_model_len: int) -> None:
    usable = (num_blocks - 1) * block_size
    if usable < max_model_len:
        raise KVCacheError(
            f"the KV cache holds {usable} tokens ({num_blocks - 1} blocks of {block_size}), "
            f"less than one sequence of max_model_len={max_model_len}: raise --kv-cache-memory "
            "(KV_CACHE_MEMORY) / --gpu-memory-utilization or lower --max-model-len"
        )


def allocate(
    num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype, device
) -> list[KVCache]:
    # Zero-filled: masked-out slots are still multiplied by a zero weight, and 0 * NaN is NaN.
    # One tensor each, not views of one: a compiled step writes its layers' caches in place
    # only when no two of its inputs share storage.
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(num_layers)
    ]
