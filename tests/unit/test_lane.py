"""Memory's request lane: bounded, and fair between clients (pure logic)."""

from __future__ import annotations

import pytest

from outpost.services.memory.lane import FairLane


def test_clients_take_turns_whatever_order_their_requests_came_in() -> None:
    lane: FairLane[str] = FairLane(total=10, per_client=5)
    for i in range(4):
        assert lane.offer("heavy", f"h{i}") is None
    assert lane.offer("light", "l0") is None
    assert lane.offer("light", "l1") is None
    # the light client's first request runs second, not fifth
    assert lane.clear() == ["h0", "l0", "h1", "l1", "h2", "h3"]
    assert len(lane) == 0 and lane.take() is None


def test_past_a_clients_bound_only_that_client_is_shed() -> None:
    lane: FairLane[int] = FairLane(total=10, per_client=2)
    assert lane.offer("a", 1) is None and lane.offer("a", 2) is None
    why = lane.offer("a", 3)
    assert why is not None and "request_queue_per_client" in why
    assert lane.offer("b", 4) is None
    assert lane.take() == 1
    assert lane.offer("a", 5) is None  # room again once one of its own ran
    assert len(lane) == 3


def test_past_the_total_every_client_is_shed() -> None:
    lane: FairLane[int] = FairLane(total=2, per_client=2)
    assert lane.offer("a", 1) is None and lane.offer("b", 2) is None
    why = lane.offer("c", 3)
    assert why is not None and "memory.request_queue" in why
    assert len(lane) == 2


def test_a_lane_holds_at_least_one() -> None:
    with pytest.raises(ValueError):
        FairLane(total=0, per_client=1)
