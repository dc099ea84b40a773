"""AckTracker: when a received message may be acknowledged (pure logic, no broker)."""

from __future__ import annotations

import pytest

from outpost.acks import AckTracker, Turn


class Acks:
    """The ``ack`` callback: records (mid, qos) in the order they were acknowledged."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []

    def __call__(self, mid: int, qos: int) -> None:
        self.sent.append((mid, qos))

    @property
    def mids(self) -> list[int]:
        return [mid for mid, _ in self.sent]


@pytest.fixture
def acks() -> Acks:
    return Acks()


@pytest.fixture
def tracker(acks: Acks) -> AckTracker:
    return AckTracker(acks)


def test_a_sealed_turn_with_nothing_held_is_acknowledged_at_once(tracker: AckTracker, acks: Acks) -> None:
    t = tracker.single(1, 1)
    assert acks.sent == []
    assert tracker.waiting == 1
    tracker.seal(t)
    assert acks.sent == [(1, 1)]
    assert tracker.waiting == 0
    assert tracker.acknowledged == 1
    assert t.done


def test_qos2_is_acknowledged_with_its_qos(tracker: AckTracker, acks: Acks) -> None:
    tracker.seal(tracker.single(9, 2))
    assert acks.sent == [(9, 2)]


def test_in_order_acknowledgement(tracker: AckTracker, acks: Acks) -> None:
    t1, t2, t3 = tracker.single(1, 1), tracker.single(2, 1), tracker.single(3, 1)
    tracker.seal(t3)
    tracker.seal(t2)
    assert acks.sent == []  # t1 is not done: nothing after it goes first
    assert tracker.waiting == 3
    tracker.seal(t1)
    assert acks.mids == [1, 2, 3]
    assert tracker.acknowledged == 3
    assert tracker.waiting == 0


def test_a_held_turn_waits_for_its_release(tracker: AckTracker, acks: Acks) -> None:
    t = tracker.single(1, 1)
    tracker.hold(t)
    tracker.hold(t)
    tracker.seal(t)
    assert acks.sent == []
    assert not t.done
    tracker.release(t)
    assert acks.sent == []
    tracker.release(t)
    assert acks.mids == [1]


def test_release_before_seal_waits_for_the_seal(tracker: AckTracker, acks: Acks) -> None:
    t = tracker.single(1, 1)
    tracker.hold(t)
    tracker.release(t)
    assert acks.sent == []  # the handler has not returned yet
    tracker.seal(t)
    assert acks.mids == [1]


def test_a_later_turn_waits_behind_a_held_one(tracker: AckTracker, acks: Acks) -> None:
    t1, t2 = tracker.single(1, 1), tracker.single(2, 1)
    tracker.hold(t1)
    tracker.seal(t1)
    tracker.seal(t2)
    assert acks.sent == []
    tracker.release(t1)
    assert acks.mids == [1, 2]


def test_a_publish_holds_its_turn_until_confirmed(tracker: AckTracker, acks: Acks) -> None:
    t = tracker.single(1, 1)
    tracker.track(100, t)
    tracker.seal(t)
    assert acks.sent == []
    assert tracker.stats() == {"turns_waiting": 1, "publishes_waiting": 1}
    tracker.published(100)
    assert acks.mids == [1]
    assert tracker.stats() == {"turns_waiting": 0, "publishes_waiting": 0}


def test_one_publish_tracked_to_several_turns(tracker: AckTracker, acks: Acks) -> None:
    t1, t2, t3 = tracker.single(1, 1), tracker.single(2, 1), tracker.single(3, 1)
    tracker.track(100, [t1, t2])
    tracker.track(101, [t2, t3])
    for t in (t1, t2, t3):
        tracker.seal(t)
    assert (t1.holds, t2.holds, t3.holds) == (1, 2, 1)
    tracker.published(101)
    assert acks.sent == []  # t1 still waits for 100, and t2 too
    assert (t1.holds, t2.holds, t3.holds) == (1, 1, 0)
    tracker.published(100)
    assert acks.mids == [1, 2, 3]


def test_a_turn_named_twice_in_one_publish_is_held_once(tracker: AckTracker, acks: Acks) -> None:
    t = tracker.single(1, 1)
    tracker.track(100, [t, t, t])
    assert t.holds == 1
    tracker.seal(t)
    tracker.published(100)
    assert acks.mids == [1]
    assert t.holds == 0


def test_tracking_to_no_turn_holds_nothing(tracker: AckTracker, acks: Acks) -> None:
    tracker.track(100, [])
    assert tracker.stats()["publishes_waiting"] == 0
    tracker.published(100)  # nobody waits for it
    t = tracker.single(1, 1)
    tracker.seal(t)
    assert acks.mids == [1]


def test_a_mid_nobody_tracks_is_ignored(tracker: AckTracker, acks: Acks) -> None:
    t = tracker.single(1, 1)
    tracker.track(100, t)
    tracker.seal(t)
    tracker.published(555)  # a QoS 1 publish made for no turn (status, metrics)
    assert acks.sent == []
    assert t.holds == 1
    tracker.published(100)
    tracker.published(100)  # confirmed twice: the second is ignored too
    assert acks.mids == [1]
    assert t.holds == 0


def test_qos0_messages_are_never_acknowledged_but_keep_their_place(tracker: AckTracker, acks: Acks) -> None:
    t0 = tracker.single(0, 0)  # paho gives QoS 0 messages mid 0
    t1 = tracker.single(7, 1)
    assert t0.messages == []
    tracker.hold(t0)
    tracker.seal(t0)
    tracker.seal(t1)
    assert acks.sent == []  # the QoS 1 message behind a held QoS 0 turn waits in order
    tracker.release(t0)
    assert acks.sent == [(7, 1)]
    assert tracker.acknowledged == 1  # counts acknowledgements, not turns


def test_qos0_messages_in_a_batch_turn_are_not_acknowledged(tracker: AckTracker, acks: Acks) -> None:
    tracker.batched(0, 0)
    tracker.batched(5, 1)
    tracker.batched(0, 0)
    tracker.seal_batch()
    assert acks.sent == [(5, 1)]


def test_batch_turn_collects_messages_until_sealed(tracker: AckTracker, acks: Acks) -> None:
    assert tracker.open_batch is None
    a = tracker.batched(1, 1)
    b = tracker.batched(2, 1)
    assert a is b is tracker.open_batch
    assert tracker.waiting == 1
    assert acks.sent == []
    done: list[str] = []
    sealed = tracker.seal_batch(lambda: done.append("committed"))
    assert sealed is a
    assert tracker.open_batch is None
    assert acks.mids == [1, 2]
    assert done == ["committed"]


def test_seal_batch_without_an_open_batch_is_a_no_op(tracker: AckTracker, acks: Acks) -> None:
    ran: list[int] = []
    assert tracker.seal_batch(lambda: ran.append(1)) is None
    assert ran == []
    assert acks.sent == []


def test_batch_on_done_runs_when_acknowledged_not_when_sealed(tracker: AckTracker, acks: Acks) -> None:
    t = tracker.batched(1, 1)
    tracker.track(100, t)
    done: list[str] = []

    def on_done() -> None:
        done.append("committed")
        assert acks.mids == [1]  # after the acknowledgement

    tracker.seal_batch(on_done)
    assert done == []
    assert acks.sent == []
    tracker.published(100)
    assert done == ["committed"]


def test_batch_turns_are_acknowledged_in_order_with_their_on_done(tracker: AckTracker, acks: Acks) -> None:
    order: list[str] = []
    first = tracker.batched(1, 1)
    tracker.batched(2, 1)
    tracker.track(100, first)
    tracker.seal_batch(lambda: order.append("first"))
    second = tracker.batched(3, 1)
    assert second is not first
    tracker.seal_batch(lambda: order.append("second"))
    assert order == []  # the second batch is done but waits behind the first
    assert acks.sent == []
    tracker.published(100)
    assert order == ["first", "second"]
    assert acks.mids == [1, 2, 3]


def test_single_and_batch_turns_interleave_in_arrival_order(tracker: AckTracker, acks: Acks) -> None:
    s1 = tracker.single(1, 1)
    tracker.batched(2, 1)
    s3 = tracker.single(3, 1)
    tracker.batched(4, 1)  # joins the open batch turn, which arrived before s3
    tracker.seal(s3)
    tracker.seal(s1)
    assert acks.mids == [1]
    tracker.seal_batch()
    assert acks.mids == [1, 2, 4, 3]


def test_every_message_is_acknowledged_exactly_once(tracker: AckTracker, acks: Acks) -> None:
    turns: list[Turn] = []
    mid = 0
    for i in range(200):
        mid += 1
        if i % 3 == 0:
            tracker.batched(mid, 1)
            if i % 9 == 0:
                tracker.seal_batch()
            continue
        t = tracker.single(mid, 1)
        tracker.track(10_000 + mid, t)
        turns.append(t)
        tracker.seal(t)
    tracker.seal_batch()
    for t in reversed(turns):  # confirmations in the worst order
        tracker.published(10_000 + t.messages[0][0])
    assert sorted(acks.mids) == list(range(1, mid + 1))
    assert tracker.acknowledged == mid
    assert tracker.waiting == 0
    assert tracker.stats() == {"turns_waiting": 0, "publishes_waiting": 0}


def test_turn_repr_says_what_holds_it() -> None:
    t = Turn()
    t.holds = 2
    assert repr(t) == "Turn(messages=0, holds=2, sealed=False)"


def test_a_held_turn_in_its_own_lane_does_not_hold_the_default_lane(tracker: AckTracker, acks: Acks) -> None:
    slow = tracker.single(1, 1, "requests")
    tracker.hold(slow)  # a request at work for seconds
    tracker.seal(slow)
    tracker.batched(2, 1)
    tracker.seal_batch()  # the log's commit meanwhile
    fast = tracker.single(3, 1, "requests")
    tracker.seal(fast)
    assert acks.mids == [2]  # the log is acknowledged; the later request waits for the earlier one
    assert tracker.waiting == 2
    tracker.release(slow)
    assert acks.mids == [2, 1, 3]
    assert tracker.waiting == 0
