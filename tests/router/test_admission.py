"""The waiting bounds of `Admission.admit`, which the async engine asks before a request's stream
starts (the 429 path end to end is in integration/test_operations.py)."""

from __future__ import annotations

import pytest

from router.engine.admission import Admission
from router.engine.outputs import Overloaded


def _engine(**bounds) -> Admission:
    return Admission(max_concurrency=1, **bounds)


def test_waiting_tokens_bound_refuses_past_it_but_always_lets_one_prompt_in():
    e = _engine(max_waiting_tokens=100)
    e.admit(5000)  # nothing waits: even a prompt over the bound only waits for its turn
    e.num_waiting, e.num_waiting_tokens = 1, 60
    e.admit(40)
    with pytest.raises(Overloaded) as refused:
        e.admit(41)
    assert refused.value.reason == "waiting_tokens"
    assert "60 prompt tokens" in str(refused.value) and "--max-waiting-tokens 100" in str(
        refused.value
    )


def test_waiting_requests_bound_and_no_bound():
    e = _engine(max_waiting_requests=2)
    e.num_waiting = 1
    e.admit(10)
    e.num_waiting = 2
    with pytest.raises(Overloaded) as refused:
        e.admit(10)
    assert refused.value.reason == "waiting_requests"
    unbounded = _engine()
    unbounded.num_waiting, unbounded.num_waiting_tokens = 10**6, 10**9
    unbounded.admit(10**6)
