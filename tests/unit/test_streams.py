"""The sending side of outpost.streams without a broker: the window, go-back-N after resend_s or
when the link comes back, acknowledgements that trim, stale and bogus ones, an unknown history
sent again, and a new epoch when the sender starts afresh."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from outpost.bus import Alarm, Later
from outpost.contracts import StreamAck
from outpost.service import ServiceRuntime
from outpost.store import Store
from outpost.streams import SENDER_SCHEMA, ByteBucket, OffsetStreams, Records
from outpost.topics import Topics


class ListSource:
    def __init__(self, n: int, *, made_ns: int = 0) -> None:
        self.records: Records = [(i, {"n": i}) for i in range(1, n + 1)]
        self.snapshots = 0
        self.made_ns = made_ns or time.time_ns()
        """When record i was made: ``made_ns + i`` s."""

    def after(self, offset: int, limit: int) -> Records:
        return [r for r in self.records if r[0] > offset][:limit]

    def trim(self, upto: int) -> None:
        self.records = [r for r in self.records if r[0] > upto]

    def last(self) -> int:
        return self.records[-1][0] if self.records else 0

    def expire(self, before_ns: int) -> int:
        return 0

    def snapshot(self) -> int:
        self.snapshots += 1
        return 0

    def pending(self, after: int) -> tuple[int, int | None]:
        held = [o for o, _ in self.records if o > after]
        return len(held), (self.made_ns + held[0] * 10**9) if held else None


class FakeRuntime:
    def __init__(self) -> None:
        self.topics = Topics(site="shop-1")
        self.metrics = type("M", (), {"counters": Counter()})()
        self.sent: list[dict[str, Any]] = []
        self.subscribed: list[str] = []
        self.laters: list[tuple[float, Any]] = []

    def later(self, delay_s: float, fn: Any) -> Later:
        self.laters.append((delay_s, fn))
        return Later(delay_s, len(self.laters), fn)

    def alarm(self, fn: Any) -> Alarm:
        return Alarm(self.later, fn)

    def run_laters(self) -> None:
        laters, self.laters = self.laters, []
        for _delay, fn in laters:
            fn()

    def subscribe(self, pattern: str, handler: Any, **_: Any) -> None:
        self.subscribed.append(pattern)

    def every(self, _interval_s: float, _fn: Any) -> None:
        pass

    def publish(self, topic: str, payload: bytes, **_: Any) -> int:
        assert topic == self.topics.up("memory", orjson.loads(payload)["stream"])
        self.sent.append(orjson.loads(payload))
        return 1


def make(tmp_path: Path, src: ListSource, *, afresh: bool = False) -> tuple[OffsetStreams, FakeRuntime]:
    rt = FakeRuntime()
    store = Store(tmp_path / "sync.db", SENDER_SCHEMA)
    s = OffsetStreams(
        cast(ServiceRuntime, rt),
        store,
        {"ltm": src},
        part="memory",
        window=4,
        batch=3,
        resend_s=10.0,
        link_topic=rt.topics.uplink_state(),
        afresh=afresh,
    )
    return s, rt


def test_window_acks_resend_and_link(tmp_path: Path) -> None:
    src = ListSource(10)
    s, rt = make(tmp_path, src)
    assert rt.subscribed == [rt.topics.down("memory", "ack"), rt.topics.uplink_state()]
    s.pump()
    assert rt.sent == []  # the link is down until the bridge says up
    s.link(True)
    assert [d for d, _ in rt.laters] == [0.0]  # the link coming up pumps at once, not at a tick
    rt.run_laters()
    assert [(m["prev"], [o for o, _ in m["records"]]) for m in rt.sent] == [(0, [1, 2, 3]), (3, [4])]
    assert rt.sent[0]["id"] == "shop-1-ltm-1-3" and rt.sent[0]["v"] == 1 and rt.sent[0]["epoch"] == s.epoch
    st = s.streams["ltm"]
    s.take(st, StreamAck(stream="ltm", offset=3, epoch=s.epoch))
    assert st.acked == 3 and src.after(0, 100)[0][0] == 4  # trimmed
    rt.sent.clear()
    s.pump()
    assert [[o for o, _ in m["records"]] for m in rt.sent] == [[5, 6, 7]]
    # no progress for resend_s: back to the last acknowledged offset
    st.progress_at -= 11
    rt.sent.clear()
    s.pump()
    assert rt.metrics.counters["sync_resends"] == 1 and rt.sent[0]["prev"] == 3
    # stale (another epoch) and repeated acknowledgements change nothing
    s.take(st, StreamAck(stream="ltm", offset=9, epoch="old"))
    s.take(st, StreamAck(stream="ltm", offset=2, epoch=s.epoch))
    assert st.acked == 3 and rt.metrics.counters["sync_stale_acks"] == 1
    with pytest.raises(ValueError, match="never sent"):
        s._stream_of(StreamAck(stream="ltm", offset=99, epoch=s.epoch))
    with pytest.raises(ValueError, match="unknown stream"):
        s._stream_of(StreamAck(stream="nope", offset=1, epoch=s.epoch))
    # the receiver lost the history: a snapshot, and everything again from 0
    s.take(st, StreamAck(stream="ltm", offset=0, epoch=s.epoch, unknown=True))
    assert src.snapshots == 2 and (st.acked, st.sent) == (0, 0)  # one at the first start
    # the backlog is what the source still holds (1..3 were acknowledged and forgotten)
    assert s.status()["sync_ltm"] == {"acked": 0, "backlog": 7}


def test_status_reports_each_streams_backlog_and_the_age_of_its_oldest_record(tmp_path: Path) -> None:
    """``uplink``: per stream, the records not yet acknowledged and how long ago the oldest of them
    was made (what the telemetry service rolls up); nothing waiting is age 0."""
    made = time.time_ns() - 100 * 10**9  # record i was made 100 - i seconds ago
    src = ListSource(10, made_ns=made)
    s, _ = make(tmp_path, src)
    st = s.streams["ltm"]
    status = s.status()
    assert status["uplink_up"] is False
    assert status["uplink"]["ltm"]["backlog"] == 10
    assert 99.0 <= status["uplink"]["ltm"]["age_s"] < 3600  # record 1 is the oldest
    s.link(True)
    s.pump()
    s.take(st, StreamAck(stream="ltm", offset=4, epoch=s.epoch))
    status = s.status()
    assert status["uplink_up"] is True
    assert status["uplink"]["ltm"]["backlog"] == 6  # sent is not acknowledged: 5..10 still count
    assert 95.0 <= status["uplink"]["ltm"]["age_s"] < 3600  # now record 5 is the oldest
    assert status["sync_ltm"] == {"acked": 4, "backlog": 6}
    s.take(st, StreamAck(stream="ltm", offset=10, epoch=s.epoch))
    assert s.status()["uplink"] == {"ltm": {"backlog": 0, "age_s": 0.0}}
    s.close()
    assert s.status()["uplink"] == {"ltm": {"backlog": 0, "age_s": 0.0}}  # kept after the close
    s.store.close()


def test_the_epoch_survives_a_restart_unless_afresh(tmp_path: Path) -> None:
    s, _ = make(tmp_path, ListSource(3))
    s.take(s.streams["ltm"], StreamAck(stream="ltm", offset=2, epoch=s.epoch))
    epoch = s.epoch
    s.store.close()
    again, _ = make(tmp_path, ListSource(3))
    assert again.epoch == epoch and again.streams["ltm"].acked == 2
    again.store.close()
    src = ListSource(3)
    fresh, _ = make(tmp_path, src, afresh=True)
    assert fresh.epoch != epoch and fresh.streams["ltm"].acked == 0 and src.snapshots == 1
    fresh.store.close()


def test_the_byte_gate_lets_the_first_stream_go_first(tmp_path: Path) -> None:
    """With a gate, the most urgent stream (the first given) takes what the bucket holds, and no
    later stream is sent ahead of it; the bucket's debt holds everything until it refills."""
    rt = FakeRuntime()
    gate = ByteBucket(1000, 1, now=0.0)
    s = OffsetStreams(
        cast(ServiceRuntime, rt),
        Store(tmp_path / "sync.db", SENDER_SCHEMA),
        {"alerts": ListSource(5), "events": ListSource(100)},
        part="memory",
        window=100,
        batch=10,
        resend_s=10.0,
        link_topic=None,
        gate=gate,
    )
    gate.at = time.monotonic()  # the pump's clock
    assert [d for d, _ in rt.laters] == [0.0]  # no link to wait for: the start pumps at once
    rt.run_laters()
    assert [m["stream"] for m in rt.sent] == ["alerts"]  # one message, then the bucket is in debt
    assert gate.tokens < 0
    # the sender asks to be woken when the debt is paid (at 1,000 bytes/s) and when the answer in
    # flight falls overdue (resend_s), not polled
    debt, overdue = sorted(d for d, _ in rt.laters)
    assert debt == pytest.approx(-gate.tokens / 1000, abs=0.01)
    assert overdue == pytest.approx(10.001, abs=0.05)
    gate.burst = gate.tokens = 1e9  # refilled
    s.pump()
    assert [m["stream"] for m in rt.sent][1:] == ["events"] * 10


def test_an_answer_in_flight_wakes_the_sender_when_it_falls_overdue(tmp_path: Path) -> None:
    """No timer looks for overdue answers: the sender asks to be woken when the first falls due,
    and that wake-up sends again from the acknowledged offset."""
    s, rt = make(tmp_path, ListSource(10))
    s.link(True)
    rt.run_laters()
    assert len(rt.sent) == 2  # the window (4) in batches of 3
    [(delay, wake)] = rt.laters
    assert delay == pytest.approx(10.001, abs=0.05)  # resend_s after the first send
    rt.laters.clear()
    s.streams["ltm"].progress_at -= 11  # as if those 10 s had passed without an answer
    rt.sent.clear()
    wake()
    assert rt.metrics.counters["sync_resends"] == 1 and rt.sent[0]["prev"] == 0
    [(delay, _)] = rt.laters
    assert delay == pytest.approx(20.001, abs=0.05)  # the next waits twice as long
    s.take(s.streams["ltm"], StreamAck(stream="ltm", offset=4, epoch=s.epoch))
    rt.laters.clear()
    s.pump()  # what the acknowledgement's pump does: the rest goes, and its answer is awaited
    [(delay, _)] = rt.laters
    assert delay == pytest.approx(10.001, abs=0.05)


def test_resends_in_a_row_without_progress_wait_longer_each_time(tmp_path: Path) -> None:
    """Over a link that is gone before the bridge notices, each resend is a window queued for the
    bridge: they back off (doubling, up to 16 x resend_s) until an acknowledgement comes."""
    s, rt = make(tmp_path, ListSource(10))
    s.link(True)
    s.pump()
    st = s.streams["ltm"]
    waits = []
    for n in range(1, 7):
        for late_s in range(1, 200):  # the first pump past the wait resends
            st.progress_at = time.monotonic() - (late_s - 0.5)
            s.pump()
            if rt.metrics.counters["sync_resends"] == n:
                waits.append(late_s)
                break
    assert waits == [11, 21, 41, 81, 161, 161]
    assert rt.metrics.counters["sync_resends"] == 6
    # progress: the next resend waits resend_s again
    s.take(st, StreamAck(stream="ltm", offset=2, epoch=s.epoch))
    st.progress_at = time.monotonic() - 11
    s.pump()
    assert rt.metrics.counters["sync_resends"] == 7


def test_a_link_up_again_without_a_down_goes_back_to_the_last_acknowledged_offset(tmp_path: Path) -> None:
    """Mosquitto says ``1`` again when its bridge reconnects after its keepalive found the link dead,
    with no ``0`` before: what was in flight may be lost, so it is sent again at once."""
    s, rt = make(tmp_path, ListSource(10))
    s.link(True)
    s.pump()
    st = s.streams["ltm"]
    assert st.sent == 4
    st.resends = 3
    s.link(True)
    assert (st.sent, st.resends) == (0, 0)
    rt.sent.clear()
    s.pump()
    assert rt.sent[0]["prev"] == 0
