"""BlockAllocator on its own: counts, reference counts, the prefix cache and LRU eviction."""

from __future__ import annotations

import pytest

from router.scheduling.block_allocator import BlockAllocator


def _full(num_blocks: int = 4, **kw) -> tuple[BlockAllocator, list[int]]:
    """An allocator with every block handed out (so the free list order is ours to set)."""
    alloc = BlockAllocator(num_blocks, block_size=4, **kw)
    return alloc, alloc.allocate(num_blocks)


def test_allocate_and_free_update_counts():
    alloc = BlockAllocator(8, block_size=4)
    assert (alloc.num_free, alloc.num_used) == (8, 0)
    blocks = alloc.allocate(3)
    assert len(set(blocks)) == 3
    assert all(1 <= b <= 8 for b in blocks)  # 0 is the shard's null block
    assert (alloc.num_free, alloc.num_used) == (5, 3)
    assert [alloc.ref_count(b) for b in blocks] == [1, 1, 1]
    alloc.free(blocks)
    assert (alloc.num_free, alloc.num_used) == (8, 0)
    assert [alloc.ref_count(b) for b in blocks] == [0, 0, 0]


def test_allocate_more_than_free_raises():
    alloc = BlockAllocator(2, block_size=4)
    alloc.allocate(1)
    with pytest.raises(RuntimeError):
        alloc.allocate(2)
    assert alloc.num_free == 1


def test_shared_cached_block_is_freed_only_when_last_holder_frees():
    alloc = BlockAllocator(4, block_size=4)
    (b,) = alloc.allocate(1)
    alloc.commit(b, 111)
    hit = alloc.lookup([111])
    assert hit == [b]
    alloc.take(hit)
    assert alloc.ref_count(b) == 2
    assert alloc.num_used == 1  # shared, counted once
    alloc.free([b])
    assert alloc.ref_count(b) == 1
    assert alloc.num_free == 3
    alloc.free([b])
    assert alloc.ref_count(b) == 0
    assert alloc.num_free == 4


def test_lookup_returns_longest_cached_prefix():
    alloc = BlockAllocator(8, block_size=4)
    blocks = alloc.allocate(3)
    for b, h in zip(blocks, [10, 11, 12], strict=True):
        alloc.commit(b, h)
    assert alloc.lookup([10, 11, 12]) == blocks
    assert alloc.lookup([10, 11, 99, 12]) == blocks[:2]  # stops at the first miss
    assert alloc.lookup([99, 10]) == []
    assert alloc.lookup([]) == []
    assert alloc.num_cached == 3


def test_lookup_takes_nothing():
    alloc = BlockAllocator(4, block_size=4)
    (b,) = alloc.allocate(1)
    alloc.commit(b, 5)
    alloc.free([b])
    assert alloc.lookup([5]) == [b]
    assert alloc.ref_count(b) == 0
    assert alloc.num_free == 4


def test_freed_hashed_block_is_revived_by_lookup_and_take():
    alloc = BlockAllocator(4, block_size=4)
    a, b = alloc.allocate(2)
    alloc.commit(a, 1)
    alloc.commit(b, 2)
    alloc.free([a, b])
    assert alloc.num_free == 4
    hit = alloc.lookup([1, 2])
    assert hit == [a, b]
    assert alloc.num_revived(hit) == 2
    alloc.take(hit)
    assert alloc.num_free == 2
    assert [alloc.ref_count(x) for x in hit] == [1, 1]
    assert alloc.num_revived(hit) == 0
    # Revived blocks left the free list: new allocations never hand them out.
    assert set(alloc.allocate(2)).isdisjoint(hit)


def test_eviction_takes_least_recently_freed_first():
    alloc, (b1, b2, b3, b4) = _full(4)
    for b in (b3, b1, b4, b2):
        alloc.free([b])
    assert [alloc.allocate(1)[0] for _ in range(4)] == [b3, b1, b4, b2]


def test_revived_then_refreed_block_moves_to_back_of_free_list():
    alloc, (b1, b2, b3) = _full(3)
    alloc.commit(b1, 7)
    alloc.free([b1])
    alloc.free([b2])
    alloc.take(alloc.lookup([7]))  # b1 used again ...
    alloc.free([b1])  # ... and freed after b2: now the most recently freed
    alloc.free([b3])
    assert alloc.allocate(3) == [b2, b1, b3]


def test_evicted_block_hash_is_forgotten():
    alloc, (b1, b2) = _full(2)
    alloc.commit(b1, 100)
    alloc.commit(b2, 200)
    alloc.free([b1])
    alloc.free([b2])
    (evicted,) = alloc.allocate(1)
    assert evicted == b1
    assert alloc.lookup([100]) == []
    assert alloc.lookup([200]) == [b2]
    assert alloc.num_cached == 1
    # The evicted block comes back clean: it can be committed under a new hash.
    alloc.commit(evicted, 300)
    assert alloc.lookup([300]) == [evicted]


def test_free_releases_blocks_in_reverse_order():
    alloc, blocks = _full(4)
    alloc.free(blocks)
    assert alloc.allocate(4) == blocks[::-1]


def test_tail_blocks_are_evicted_before_prefix_blocks():
    alloc, blocks = _full(4)
    hashes = [1, 2, 3, 4]  # a chain: block i's hash covers blocks 0..i
    for b, h in zip(blocks, hashes, strict=True):
        alloc.commit(b, h)
    alloc.free(blocks)  # one sequence's whole table
    alloc.allocate(2)  # evicts the last two blocks
    assert alloc.lookup(hashes) == blocks[:2]


def test_double_free_asserts():
    alloc = BlockAllocator(4, block_size=4)
    blocks = alloc.allocate(2)
    alloc.free(blocks)
    with pytest.raises(AssertionError, match="double free"):
        alloc.free(blocks[:1])


def test_free_of_never_allocated_block_asserts():
    alloc = BlockAllocator(4, block_size=4)
    with pytest.raises(AssertionError, match="double free"):
        alloc.free([3])


def test_prefix_caching_disabled_lookup_is_always_empty():
    alloc = BlockAllocator(4, block_size=4, enable_prefix_caching=False)
    blocks = alloc.allocate(2)
    alloc.commit(blocks[0], 1)
    alloc.commit(blocks[1], 2)
    assert alloc.lookup([1, 2]) == []
    assert alloc.num_cached == 0
    alloc.free(blocks)
    assert alloc.lookup([1]) == []


def test_duplicate_hash_keeps_first_block_cached():
    alloc, (b1, b2) = _full(2)
    alloc.commit(b1, 42)
    alloc.commit(b2, 42)  # same content computed twice (two sequences admitted together)
    assert alloc.lookup([42]) == [b1]
    assert alloc.num_cached == 1
    alloc.free([b2])
    alloc.free([b1])
    alloc.allocate(1)  # evicts b2, whose hash was never the cached one
    assert alloc.lookup([42]) == [b1]


def test_commit_does_not_rehash_a_committed_block():
    alloc = BlockAllocator(2, block_size=4)
    (b,) = alloc.allocate(1)
    alloc.commit(b, 1)
    alloc.commit(b, 2)
    assert alloc.lookup([1]) == [b]
    assert alloc.lookup([2]) == []


def test_record_lookup_accumulates_hit_counters():
    alloc = BlockAllocator(2, block_size=4)
    alloc.record_lookup(3, 1)
    alloc.record_lookup(2, 2)
    assert (alloc.num_queried_blocks, alloc.num_hit_blocks) == (5, 3)
