"""Hand freed heap memory back to the operating system every so many steps.

Eager steps allocate activations, gathered K/V and logits of a different size every time;
glibc keeps what they free in its heap, fragmented, so a shard's resident memory creeps up
under a long varied load (+9 % over 10 minutes at concurrency 64, `shardserve bench-soak`)
although nothing leaks: `malloc_trim` returns those pages (~100 MiB there) in a few ms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import time

log = logging.getLogger("shardserve.heap")

TRIM_EVERY_STEPS = 256


def _libc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # absent from other C libraries (musl): nothing to do there
    except (OSError, AttributeError):
        return None


class HeapTrimmer:
    def __init__(self, every_steps: int = TRIM_EVERY_STEPS) -> None:
        self.every_steps = every_steps
        self.steps = 0
        self.trim = _libc_trim()
        self.seconds = 0.0  # spent trimming, in all

    def step(self) -> None:
        self.steps += 1
        if self.trim is None or self.steps % self.every_steps:
            return
        started = time.perf_counter()
        self.trim(0)
        self.seconds += time.perf_counter() - started
