"""How far a rolled-up p99 is from the exact p99 of the same latencies, through the real path.

Each latency sample (arrival time, latency, series) is recorded where a service records one: in an
:class:`outpost.metrics.Histogram` (HdrHistogram, microseconds). Every ``interval_s`` (a service's
metrics interval), each pseudo-service's :meth:`~outpost.metrics.Metrics.take_sketches` makes the
interval's DDSketch wire form, which goes into a :class:`outpost.contracts.MetricsBatch` (validated,
as the telemetry service receives it) and into the telemetry service's
:class:`~outpost.services.telemetry.rollup.Rollups`, which merges a window's batches into one
``service_latency`` point per (service, histogram). That point's ``p99_ms`` is compared with the
exact p99 of the samples that went into it.

The exact p99 uses the same rank as DDSketch (``floor(q * (n - 1))`` of the sorted samples, the
"lower" method), so the difference is the sketch's and the HDR buckets' error, not a different
definition of a quantile. The error bound is DDSketch's 0.5% plus 0.1% for the HDR bucket
(outpost.sketch).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from outpost.contracts import MetricsBatch
from outpost.metrics import Metrics
from outpost.services.telemetry.rollup import Rollups

HISTOGRAM = "event_latency"
"""The pseudo-services' histogram: one series per (service, window) in ``service_latency``."""

QUANTILES = {"p50_ms": 0.50, "p95_ms": 0.95, "p99_ms": 0.99}


@dataclass(frozen=True, slots=True)
class Sample:
    arrival_ns: int
    latency_ns: int
    service: str  # the pseudo-service whose histogram records it


def exact_quantile(sorted_ms: Sequence[float], q: float) -> float:
    """The sample at rank ``floor(q * (n - 1))``: DDSketch's definition of the q quantile."""
    if not sorted_ms:
        return 0.0
    return float(sorted_ms[math.floor(q * (len(sorted_ms) - 1))])


def rollup_accuracy(
    samples: Sequence[Sample], *, site: str, window_s: float, interval_s: float
) -> dict[str, Any]:
    """Rolled-up vs exact quantiles for every (service, window) of ``samples``; the worst and mean
    p99 error in percent of the exact value."""
    if not samples:
        return {"series_windows": 0, "samples": 0, "p99_error_pct": None, "windows": []}
    ordered = sorted(samples, key=lambda s: s.arrival_ns)
    interval_ns = int(interval_s * 1e9)
    window_ns = int(window_s * 1e9)
    first = ordered[0].arrival_ns
    started = first - 1
    services = sorted({s.service for s in ordered})
    registries = {svc: Metrics(svc) for svc in services}
    rollups = Rollups(site, window_s, started_ns=None)
    exact: dict[tuple[str, int], list[float]] = {}
    pending: dict[str, list[float]] = {svc: [] for svc in services}
    seq = itertools.count()
    batches = 0

    def publish(boundary_ns: int) -> None:
        nonlocal batches
        window = boundary_ns - boundary_ns % window_ns
        for svc, metrics in registries.items():
            sketches = metrics.take_sketches()
            if not sketches:
                continue
            batch = MetricsBatch.model_validate(
                {
                    "id": f"bench-{svc}-{next(seq)}",
                    "ts": boundary_ns,
                    "trace": "",
                    "service": svc,
                    "started": started,
                    "counters": {},
                    "histograms": {},
                    "sketches": sketches,
                }
            )
            rollups.add(batch, boundary_ns)
            batches += 1
            exact.setdefault((svc, window), []).extend(pending[svc])
            pending[svc] = []

    boundary = first - first % interval_ns + interval_ns
    for s in ordered:
        while s.arrival_ns >= boundary:
            publish(boundary)
            boundary += interval_ns
        registries[s.service].histogram(HISTOGRAM).record_ns(s.latency_ns)
        pending[s.service].append(s.latency_ns / 1e6)
    publish(boundary)

    rows: list[dict[str, Any]] = []
    for p in rollups.close(boundary + 2 * window_ns):
        if p.measurement != "service_latency" or p.tag("name") != HISTOGRAM:
            continue
        values = sorted(exact.get((p.tag("service"), p.ts_ns), []))
        row: dict[str, Any] = {
            "service": p.tag("service"),
            "window_start_ns": p.ts_ns,
            "count": p.fields.get("count", 0),
            "exact_count": len(values),
        }
        for field, q in QUANTILES.items():
            want = exact_quantile(values, q)
            got = float(p.fields.get(field, 0.0))
            row[field] = {
                "exact": round(want, 4),
                "rolled_up": round(got, 4),
                "error_pct": round(100.0 * abs(got - want) / want, 4) if want > 0 else None,
            }
        rows.append(row)
    p99_errors = [r["p99_ms"]["error_pct"] for r in rows if r["p99_ms"]["error_pct"] is not None]
    return {
        "samples": len(ordered),
        "services": services,
        "batches": batches,
        "series_windows": len(rows),
        "min_window_samples": min((r["exact_count"] for r in rows), default=0),
        "counts_agree": all(r["count"] == r["exact_count"] for r in rows),
        "p99_error_pct": round(max(p99_errors), 4) if p99_errors else None,
        "p99_error_pct_mean": round(sum(p99_errors) / len(p99_errors), 4) if p99_errors else None,
        "p50_error_pct": _worst(rows, "p50_ms"),
        "p95_error_pct": _worst(rows, "p95_ms"),
        "windows": rows,
    }


def _worst(rows: list[dict[str, Any]], field: str) -> float | None:
    errs = [r[field]["error_pct"] for r in rows if r[field]["error_pct"] is not None]
    return round(max(errs), 4) if errs else None
