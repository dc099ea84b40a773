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
    assert lane.take() == ("a", 1)
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


def test_a_client_that_comes_during_a_burst_goes_next() -> None:
    lane: FairLane[str] = FairLane(total=10, per_client=5)
    assert lane.offer("heavy", "h0") is None
    assert lane.take() == ("heavy", "h0")  # running
    for i in range(1, 4):
        assert lane.offer("heavy", f"h{i}") is None
    assert lane.offer("light", "l0") is None  # came after the burst's requests
    assert lane.take() == ("light", "l0")  # but runs before the rest of it
    assert lane.clear() == ["h1", "h2", "h3"]


def test_the_table_of_clients_is_forgotten_when_they_are_done() -> None:
    lane: FairLane[int] = FairLane(total=10, per_client=5)
    for client in ("a", "b", "c"):
        assert lane.offer(client, 1) is None
    lane.clear()
    assert lane.offer("d", 1) is None and lane.offer("d", 2) is None
    lane.clear()  # the clock moved past a, b and c
    assert list(lane._next_of) == ["d"] and lane._waiting == {}  # what bounds its memory


def test_a_busy_clients_requests_are_passed_over_and_keep_their_place() -> None:
    lane: FairLane[str] = FairLane(total=10, per_client=5)
    for job in ("a1", "a2"):
        assert lane.offer("a", job) is None
    assert lane.offer("b", "b1") is None
    assert lane.take(busy={"a"}) == ("b", "b1")
    assert lane.take(busy={"a"}) is None
    assert lane.take() == ("a", "a1")
    assert len(lane) == 1
