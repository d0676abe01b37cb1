"""KV block accounting with automatic prefix caching.

Block ids run 1..num_blocks (0 is the shard's null block). A block in use has a reference count;
a full, computed block also has a hash (its tokens and their whole prefix) under which later
sequences can share it read-only. Blocks whose count drops to zero go to the back of the free
list but keep their hash, so they can still be revived; allocation takes from the front (least
recently freed) and forgets the hash of what it evicts.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockAllocator:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * (num_blocks + 1)
        self._hash: list[int | None] = [None] * (num_blocks + 1)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks + 1))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.num_queried_blocks = 0
        self.num_hit_blocks = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def lookup(self, hashes: list[int]) -> list[int]:
        """Block ids of the longest cached prefix of `hashes` (takes nothing)."""
        if not self.enable_prefix_caching:
            return []
        hit = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            hit.append(block)
        return hit

    def record_lookup(self, queried: int, hit: int) -> None:
        self.num_queried_blocks += queried
        self.num_hit_blocks += hit

    def num_revived(self, block_ids: list[int]) -> int:
        """How many of these cached blocks sit in the free list (taking them uses free blocks)."""
        return sum(1 for b in block_ids if self._ref[b] == 0)

    def take(self, block_ids: list[int]) -> None:
        """Share cached blocks with one more sequence."""
        for b in block_ids:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"allocate({n}) with {len(self._free)} free blocks")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            h = self._hash[b]
            if h is not None:
                if self._cached.get(h) == b:
                    del self._cached[h]
                self._hash[b] = None
            self._ref[b] = 1
            out.append(b)
        return out

    def free(self, block_ids: list[int]) -> None:
        # Reverse order: a sequence's tail blocks are evicted before the prefix others may share.
        for b in reversed(block_ids):
            assert self._ref[b] > 0, f"double free of block {b}"
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None

    def commit(self, block_id: int, block_hash: int) -> None:
        """Register a full, computed block under its hash so later sequences can reuse it."""
        if not self.enable_prefix_caching or self._hash[block_id] is not None:
            return
        self._hash[block_id] = block_hash
        self._cached.setdefault(block_hash, block_id)
