"""The uplink budget and the spool: the budget holds over time, diagnostics are thinned first,
SLO points wait (in order) rather than go over it, alerts always go; the spool is bounded with a
counted policy (oldest diagnostics first, never alerts), keeps order and outlives its process."""

from __future__ import annotations

from pathlib import Path

from outpost.services.telemetry.budget import Budget, Pending, size_of
from outpost.services.telemetry.catalog import Point, Priority, point
from outpost.services.telemetry.spool import Spool

S = 1_000_000_000


def window(i: int, *, slo: int = 5, diag: int = 50, alerts: int = 0) -> list[Point]:
    ts = i * 60 * S
    out = [
        point("readings", "s1", {"device_class": f"c{k}"}, {"count": 10, "rate": 0.1}, ts) for k in range(slo)
    ]
    out += [
        point("service_counter", "s1", {"service": "x", "name": f"n{k}"}, {"count": 1, "rate": 0.01}, ts)
        for k in range(diag)
    ]
    out += [
        point("alert", "s1", {"kind": "service_down", "service": f"s{k}"}, {"count": 1}, ts)
        for k in range(alerts)
    ]
    return out


def pend(points: list[Point], start: int = 0) -> list[Pending]:
    return [Pending(start + i, p.priority, size_of(p)) for i, p in enumerate(points)]


def test_unlimited_budget_sends_everything() -> None:
    b = Budget(0, 60)
    pts = window(0)
    assert b.thin(pts, 0) == (pts, [])
    assert len(b.take(pend(pts), 0, most=1000)) == len(pts)


def test_diagnostics_are_thinned_first_and_every_series_shows() -> None:
    b = Budget(3000, 60)  # room for the SLO points and a fraction of the diagnostics
    shown: set[str] = set()
    for i in range(40):
        kept, thinned = b.thin(window(i), i)
        assert all(p.priority is Priority.DIAGNOSTIC for p in thinned)
        assert sum(1 for p in kept if p.priority is Priority.SLO) == 5
        assert thinned
        kept_diag = [p for p in kept if p.priority is Priority.DIAGNOSTIC]
        assert sum(size_of(p) for p in kept) + b.request_bytes <= 3000 * 1.2
        shown |= {p.series for p in kept_diag}
    assert len(shown) == 50  # downsampled, not starved: each series kept some windows


def test_the_budget_holds_over_time_and_slo_waits_in_order() -> None:
    per_min = 4000
    b = Budget(per_min, 60)
    queue: list[Pending] = []
    seq = 0
    sent = 0
    sent_slo: list[int] = []
    for minute in range(30):
        now = minute * 60 * S
        kept, _ = b.thin(window(minute, slo=60, diag=50), minute)
        queue += pend(kept, seq)
        seq += len(kept)
        taken = b.take(queue, now, most=5000)
        sent += b.request_bytes + sum(p.size for p in taken)
        sent_slo += [p.seq for p in taken if p.priority is Priority.SLO]
        ids = {p.seq for p in taken}
        queue = [p for p in queue if p.seq not in ids]
    assert sent <= per_min * 30 + per_min  # 30 minutes' worth and the first minute's burst
    assert sent_slo == sorted(sent_slo)  # deferred SLO points go oldest first
    assert any(p.priority is Priority.SLO for p in queue)  # more SLO than fits: deferred, not dropped


def test_alerts_always_go() -> None:
    b = Budget(600, 60)
    b.tokens = 0
    pts = window(0, slo=3, diag=3, alerts=4)
    taken = b.take(pend(pts), 0, most=100)
    assert [p.priority for p in taken] == [Priority.ALERT] * 4
    assert b.tokens < 0
    b.refund(taken)
    assert b.tokens == 0


def test_spool_keeps_order_and_outlives_its_process(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.db", 10_000_000)
    pts = window(0, slo=3, diag=3) + window(1, slo=3, diag=3)
    sp.append(pts)
    sp.close()
    sp = Spool(tmp_path / "s.db", 10_000_000)  # reopened: what was spooled is there, in order
    assert sp.count == len(pts) and sp.bytes == sum(size_of(p) for p in pts)
    head = sp.head(100)
    slo = [p for p in head if p.priority is Priority.SLO]
    assert sp.lines([p.seq for p in slo]) == [p.line() for p in pts if p.priority is Priority.SLO]
    sp.remove(slo)
    assert sp.count == len(pts) - len(slo)
    sp.close()


def test_spool_bound_drops_oldest_diagnostics_first_never_alerts(tmp_path: Path) -> None:
    one = size_of(window(0, slo=1, diag=0)[0])
    sp = Spool(tmp_path / "s.db", one * 30)
    sp.append(window(0, slo=5, diag=10, alerts=2))
    sp.append(window(1, slo=5, diag=10, alerts=2))
    assert sp.bytes <= one * 30 * 1.2
    assert sp.dropped[Priority.ALERT] == 0 and sp.dropped[Priority.DIAGNOSTIC] > 0
    rows = sp.head(1000)
    assert sum(p.priority is Priority.ALERT for p in rows) == 4
    kept_diag = sp.lines([p.seq for p in rows if p.priority is Priority.DIAGNOSTIC])
    assert sum(line.endswith(f" {60 * S}") for line in kept_diag) == 10  # window 0's went first
    # full of SLO and alerts: SLO gives way next, alerts never
    sp.append([p for p in window(2, slo=40, diag=0, alerts=3)])
    assert sp.dropped[Priority.SLO] > 0 and sp.dropped[Priority.ALERT] == 0
    assert sum(p.priority is Priority.ALERT for p in sp.head(1000)) == 7
    sp.close()
