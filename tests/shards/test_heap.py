"""The shard's heap trimming: every so many steps, and harmless where the C library has none."""

from __future__ import annotations

import sys

import pytest

from shards.heap import HeapTrimmer


def test_trims_once_every_n_steps():
    calls = []
    t = HeapTrimmer(every_steps=3)
    t.trim = lambda pad: calls.append(pad)
    for _ in range(7):
        t.step()
    assert calls == [0, 0]  # after steps 3 and 6


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_the_real_trim_runs():
    t = HeapTrimmer(every_steps=1)
    assert t.trim is not None
    blocks = [bytearray(200_000) for _ in range(50)]  # freed heap memory to hand back
    del blocks
    t.step()
    assert t.seconds > 0
