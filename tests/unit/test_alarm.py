"""Alarm: one pending wake-up, however often it is asked for (pure: the scheduler and the clock
are the test's own)."""

from __future__ import annotations

from collections.abc import Callable

from outpost.bus import Alarm, Later


class Scheduler:
    """What Bus.call_later does, by hand: entries kept in order, run when the test says."""

    def __init__(self) -> None:
        self.now = 1_000_000_000
        self.entries: list[Later] = []

    def clock(self) -> int:
        return self.now

    def later(self, delay_s: float, fn: Callable[[], None]) -> Later:
        entry = Later(self.now / 1e9 + delay_s, len(self.entries), fn)
        self.entries.append(entry)
        return entry

    def live(self) -> list[float]:
        return sorted(round(e.due - self.now / 1e9, 6) for e in self.entries if not e.cancelled)

    def run_due(self, advance_s: float) -> None:
        self.now += int(advance_s * 1e9)
        for e in sorted(self.entries):
            if not e.cancelled and e.due <= self.now / 1e9 + 1e-9:
                e.cancel()
                e.fn()


def make() -> tuple[Scheduler, Alarm, list[int]]:
    s = Scheduler()
    rang: list[int] = []
    return s, Alarm(s.later, lambda: rang.append(s.now), s.clock), rang


def test_soon_keeps_the_wake_up_already_set() -> None:
    s, alarm, rang = make()
    alarm.soon(0.5)
    alarm.soon(0.1)  # asked again meanwhile: shares the first
    alarm.soon(2.0)
    assert alarm.pending
    assert s.live() == [0.5]
    s.run_due(0.5)
    assert len(rang) == 1 and not alarm.pending


def test_at_keeps_the_earlier_and_drops_the_later() -> None:
    s, alarm, rang = make()
    alarm.at(s.now + 300_000_000)
    alarm.at(s.now + 500_000_000)  # later: kept as it was
    assert s.live() == [0.3]
    alarm.at(s.now + 100_000_000)  # sooner: replaces it
    assert s.live() == [0.1]
    s.run_due(1.0)
    assert len(rang) == 1


def test_the_same_deadline_asked_again_does_not_reschedule() -> None:
    s, alarm, _ = make()
    for _ in range(3):
        alarm.at(s.now + 10)
    assert len(s.entries) == 1


def test_cancel_drops_it_and_a_new_one_can_be_set() -> None:
    s, alarm, rang = make()
    alarm.soon(0.2)
    alarm.cancel()
    alarm.cancel()  # twice: nothing happens
    assert not alarm.pending and s.live() == []
    s.run_due(1.0)
    assert rang == []
    alarm.soon(0.2)
    s.run_due(0.2)
    assert len(rang) == 1


def test_fn_may_set_it_again_while_it_rings() -> None:
    s = Scheduler()
    rang: list[int] = []

    def ring() -> None:
        rang.append(s.now)
        if len(rang) < 3:
            alarm.soon(1.0)

    alarm = Alarm(s.later, ring, s.clock)
    alarm.soon(1.0)
    for _ in range(5):
        s.run_due(1.0)
    assert len(rang) == 3 and not alarm.pending


def test_a_past_deadline_rings_at_once() -> None:
    s, alarm, rang = make()
    alarm.at(s.now - 5_000_000_000)
    assert s.live() == [0.0]
    s.run_due(0.0)
    assert len(rang) == 1
