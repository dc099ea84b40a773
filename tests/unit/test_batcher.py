"""The micro-batcher: full batches at max_batch, due batches after max_wait, nothing lost, nothing
waiting beyond max_batch per key."""

from __future__ import annotations

import pytest

from outpost.services.inference.batcher import MicroBatcher


def test_full_batch_is_returned_at_max_batch() -> None:
    b: MicroBatcher[str, int] = MicroBatcher(3, 1000)
    assert b.add("m", 1, 0) is None
    assert b.add("m", 2, 1) is None
    assert b.add("m", 3, 2) == [1, 2, 3]
    assert len(b) == 0


def test_due_after_the_first_waited_max_wait() -> None:
    b: MicroBatcher[str, int] = MicroBatcher(10, 1000)
    b.add("a", 1, 0)
    b.add("a", 2, 900)
    b.add("b", 3, 500)
    assert b.due(999) == []
    assert b.due(1000) == [("a", [1, 2])]
    assert b.due(1499) == []
    assert b.due(1500) == [("b", [3])]
    assert len(b) == 0


def test_next_due_is_when_the_oldest_waiting_batch_falls_due() -> None:
    b: MicroBatcher[str, int] = MicroBatcher(2, 1000)
    assert b.next_due_ns() is None
    b.add("a", 1, 300)
    b.add("b", 2, 100)
    assert b.next_due_ns() == 1100
    assert b.add("b", 3, 200) == [2, 3]  # full: taken, no longer waits
    assert b.next_due_ns() == 1300
    assert b.due(1300) == [("a", [1])]
    assert b.next_due_ns() is None


def test_pending_never_exceeds_max_batch_and_drain_returns_everything() -> None:
    b: MicroBatcher[str, int] = MicroBatcher(4, 10**9)
    out: list[int] = []
    for i in range(103):
        full = b.add("k" if i % 2 else "j", i, i)
        if full:
            out.extend(full)
        assert len(b) <= 2 * 4
    for _, batch in b.drain():
        out.extend(batch)
    assert sorted(out) == list(range(103))
    assert b.take("nothing") == []


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(0, 1)
