"""Rollups: counts from counter differences (restarts included), quantiles from merged sketches
(checked against the exact quantiles of the raw values), every catalog measurement made from
the metric it comes from, and points in line protocol."""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from outpost.contracts import MetricsBatch
from outpost.services.telemetry.catalog import MEASUREMENTS, Point, Priority, point
from outpost.services.telemetry.rollup import Rollups
from outpost.sketch import new_sketch, to_wire

S = 1_000_000_000
T0 = 1_800_000_000 * S  # a multiple of 60 s: windows start here


def batch(service: str, ts: int, counters: dict[str, int], *, started: int = 1, **extra: Any) -> MetricsBatch:
    return MetricsBatch.model_validate(
        {
            "v": 1,
            "id": f"{service}-{ts}",
            "ts": ts,
            "trace": "",
            "service": service,
            "started": started,
            "counters": counters,
            "histograms": {},
            **extra,
        }
    )


def by(points: list[Point], measurement: str, **tags: str) -> list[Point]:
    return [p for p in points if p.measurement == measurement and all(p.tag(k) == v for k, v in tags.items())]


def test_counter_deltas_per_window_and_restart() -> None:
    r = Rollups("s1", 60)
    r.add(batch("ingest", T0 + 1 * S, {"readings.fridge": 100}), T0 + 1 * S)
    r.add(batch("ingest", T0 + 30 * S, {"readings.fridge": 160}), T0 + 30 * S)
    assert r.close(T0 + 59 * S) == []  # the window is not over
    first = r.close(T0 + 60 * S)
    (p,) = by(first, "readings", device_class="fridge")
    assert p.fields["count"] == 160 and p.ts_ns == T0 and p.priority is Priority.SLO
    assert abs(float(p.fields["rate"]) - 160 / 60) < 1e-9
    # next window: +40, then the service restarts (new started) and counts 25 from 0
    r.add(batch("ingest", T0 + 61 * S, {"readings.fridge": 200}), T0 + 61 * S)
    r.add(batch("ingest", T0 + 70 * S, {"readings.fridge": 25}, started=2), T0 + 70 * S)
    r.add(batch("ingest", T0 + 80 * S, {"readings.fridge": 30}, started=2), T0 + 80 * S)
    (p,) = by(r.close(T0 + 120 * S), "readings", device_class="fridge")
    assert p.fields["count"] == 40 + 25 + 5 and p.ts_ns == T0 + 60 * S


def test_counter_going_down_without_new_started_is_a_restart() -> None:
    r = Rollups("s1", 10)
    r.add(batch("memory", T0, {"commits": 50}), T0)
    r.add(batch("memory", T0 + S, {"commits": 7}), T0 + S)
    (p,) = by(r.close(T0 + 10 * S), "service_counter", service="memory", name="commits")
    assert p.fields["count"] == 57


def test_a_process_older_than_the_rollup_is_a_baseline() -> None:
    r = Rollups("s1", 10, started_ns=T0)
    r.add(batch("ingest", T0 + S, {"readings.a": 1000}, started=T0 - 100 * S), T0 + S)
    r.add(batch("ingest", T0 + 2 * S, {"readings.a": 1010}, started=T0 - 100 * S), T0 + 2 * S)
    r.add(batch("agents", T0 + 2 * S, {"decisions.x.act": 3}, started=T0 + S), T0 + 2 * S)
    pts = r.close(T0 + 10 * S)
    assert by(pts, "readings")[0].fields["count"] == 10
    assert by(pts, "cost", agent="x")[0].fields["decisions"] == 3


def sketch_of(values: list[float]) -> dict[str, Any]:
    s = new_sketch()
    for v in values:
        s.add(v)
    return to_wire(s)


def test_merged_quantiles_match_the_exact_ones() -> None:
    """Three processes, twelve batches each, each with its own distribution: the window's one p99
    (36 sketches merged) is within 1% of the exact p99 of all 14,400 values, and so is p50."""
    rng = random.Random(7)
    r = Rollups("s1", 60)
    every: list[float] = []
    for i in range(12):
        for k, svc in enumerate(("inference", "inference-b", "inference-c")):
            vals = [rng.lognormvariate(1.0 + k * 0.5, 0.6) for _ in range(400)]
            every += vals
            r.add(batch(svc, T0 + i * 5 * S, {}, sketches={"infer.m1.v2": sketch_of(vals)}), T0 + i * 5 * S)
    (p,) = by(r.close(T0 + 60 * S), "inference_latency", model="m1", version="v2")
    assert p.fields["count"] == len(every)
    for q, f in ((0.5, "p50_ms"), (0.99, "p99_ms")):
        exact = float(np.quantile(np.array(every), q, method="lower"))
        assert abs(float(p.fields[f]) - exact) / exact < 0.01, (f, p.fields[f], exact)
    assert abs(float(p.fields["max_ms"]) - max(every)) / max(every) < 0.001


def test_readings_of_two_processes_add_up() -> None:
    r = Rollups("s1", 60)
    r.add(batch("ingest", T0, {"readings.fridge": 5}), T0)
    r.add(batch("ingest-2", T0, {"readings.fridge": 7}), T0)
    (p,) = by(r.close(T0 + 60 * S), "readings", device_class="fridge")
    assert p.fields["count"] == 12


def test_one_series_merges_batches_of_a_window() -> None:
    rng = random.Random(3)
    r = Rollups("s1", 60)
    vals_all: list[float] = []
    for i in range(12):
        vals = [rng.expovariate(1 / 20.0) + 0.1 for _ in range(500)]
        vals_all += vals
        r.add(
            batch("agents", T0 + i * 5 * S, {}, sketches={"decision_latency.triage": sketch_of(vals)}),
            T0 + i * 5 * S,
        )
    (p,) = by(r.close(T0 + 60 * S), "decision_latency", agent="triage")
    assert p.fields["count"] == len(vals_all)
    for q, f in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")):
        exact = float(np.quantile(np.array(vals_all), q, method="lower"))
        assert abs(float(p.fields[f]) - exact) / exact < 0.011, (f, p.fields[f], exact)


def test_agent_measurements_and_alerts() -> None:
    r = Rollups("s1", 60)
    r.add(batch("agents", T0 + S, {"results.a.done": 0, "answered.a": 0, "breaker_opened.a": 0}), T0 + S)
    r.add(
        batch(
            "agents",
            T0 + 5 * S,
            {
                "results.a.done": 8,
                "results.a.duplicate": 1,
                "results.a.failed": 3,
                "answered.a": 4,
                "overrides.a": 1,
                "cost_millis.a": 2500,
                "decisions.a.act": 4,
                "decisions.a.escalate": 1,
                "breaker_opened.a": 1,
                "disk_full": 1,
                "rejected": 2,
                "rejected.bad_json": 2,
            },
        ),
        T0 + 5 * S,
    )
    pts = r.close(T0 + 60 * S)
    (ts,) = by(pts, "task_success", agent="a")
    assert ts.fields == {"done": 9, "failed": 3, "rate": 0.75}
    (ov,) = by(pts, "overrides", agent="a")
    assert ov.fields == {"answered": 4, "overridden": 1, "rate": 0.25}
    (c,) = by(pts, "cost", agent="a")
    assert c.fields == {"cost": 2.5, "decisions": 5, "per_decision": 0.5}
    (d,) = by(pts, "dlq", service="agents", reason="bad_json")
    assert d.fields["count"] == 2
    kinds = {(p.tag("kind"), p.tag("service")): p.fields["count"] for p in by(pts, "alert")}
    assert kinds == {("breaker_open", "agents"): 1, ("disk_full", "agents"): 1}
    assert all(p.priority is Priority.ALERT for p in by(pts, "alert"))
    assert not by(pts, "service_counter", name="rejected")


def test_status_recovery_and_service_down() -> None:
    r = Rollups("s1", 60)
    r.status("memory", True, T0)
    r.status("memory", False, T0 + 10 * S)
    r.status("memory", False, T0 + 11 * S)  # still down: one alert
    r.status("memory", True, T0 + 14 * S)
    r.status("uplink", False, T0 + 20 * S)
    r.status("uplink", True, T0 + 30 * S)
    pts = r.close(T0 + 60 * S)
    (m,) = by(pts, "recovery", subject="memory")
    assert m.fields == {"recoveries": 1, "mttr_s": 4.0}
    assert by(pts, "recovery", subject="uplink")[0].fields["mttr_s"] == 10.0
    alerts = by(pts, "alert", kind="service_down")
    assert sorted(p.tag("service") for p in alerts) == ["memory", "uplink"]


def test_a_retained_down_status_counts_its_recovery_but_raises_no_alert() -> None:
    r = Rollups("s1", 60)
    r.status("ingest", False, T0, alert=False)
    r.status("ingest", True, T0 + 2 * S)
    pts = r.close(T0 + 60 * S)
    assert not by(pts, "alert")
    assert by(pts, "recovery", subject="ingest")[0].fields == {"recoveries": 1, "mttr_s": 2.0}


def test_process_uplink_and_other_histograms() -> None:
    r = Rollups("s1", 60)
    r.add(batch("memory", T0, {}, state={"cpu_s": 10.0, "rss_mb": 50.0}), T0)
    r.add(
        batch(
            "memory",
            T0 + 10 * S,
            {},
            state={"cpu_s": 12.5, "rss_mb": 52.5, "uplink": {"log": {"backlog": 12, "age_s": 3.5}}},
            sketches={"flush_wait": sketch_of([1.0, 2.0])},
        ),
        T0 + 10 * S,
    )
    pts = r.close(T0 + 60 * S)
    (p,) = by(pts, "process", service="memory")
    assert p.fields == {"cpu_pct": 25.0, "rss_mb": 52.5}
    (u,) = by(pts, "uplink", stream="log")
    assert u.fields == {"backlog": 12.0, "age_s": 3.5}
    (h,) = by(pts, "service_latency", service="memory", name="flush_wait")
    assert h.fields["count"] == 2 and h.priority is Priority.DIAGNOSTIC


def test_absent_metrics_make_no_points_and_every_measurement_is_known() -> None:
    r = Rollups("s1", 60)
    r.add(batch("ingest", T0, {}), T0)
    assert r.close(T0 + 60 * S) == []
    assert r.close(T0 + 600 * S) == []
    for name, m in MEASUREMENTS.items():
        assert m.fields and name.isidentifier()


def test_raw_readings_keep_their_time() -> None:
    r = Rollups("s1", 60)
    r.reading("fridge-001", "temp_c", 4.5, T0 - 3 * S, T0 + S)
    (p,) = r.close(T0 + 60 * S)
    assert p.ts_ns == T0 - 3 * S and p.tag("device_class") == "fridge"
    assert (
        p.line()
        == f"reading,device=fridge-001,device_class=fridge,metric=temp_c,site=s1 value=4.5 {T0 - 3 * S}"
    )


def test_line_protocol_escapes() -> None:
    p = point("service_counter", "s 1", {"service": "a,b", "name": "x=y"}, {"count": 3, "rate": 0.5}, 7)
    assert p.line() == "service_counter,name=x\\=y,service=a\\,b,site=s\\ 1 count=3i,rate=0.5 7"
    q = point("process", "s", {"service": "m"}, {"cpu_pct": float("nan"), "rss_mb": 1.0}, 1)
    assert "nan" not in q.line()
