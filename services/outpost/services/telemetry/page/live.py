"""The status page's live view of the site: :class:`outpost.monitor.SiteMonitor` (service status,
metrics, what the agents report), plus a bounded history of what the charts draw.

Everything comes from the broker, as an operator's tools see it: each service's metrics batch
(``.../metrics/{service}``) gives throughput (ingest's ``readings`` and ``events`` counters, as
rates between two batches of one process), per histogram the p50/p99 of the interval (from the
batch's mergeable sketch, never an average of percentiles), the dead letters by reason and the
uplink backlog. Events themselves are not watched: at thousands a second that would cost the
gateway more than the page is worth.

A metrics message that does not fit the contract (:class:`outpost.contracts.MetricsBatch`) is
counted and left out, so a broken or hostile publisher never breaks the page; the history is
bounded in time (``history_s``), in points per series and in series, whatever arrives.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from outpost.bus import Message
from outpost.contracts import MetricsBatch
from outpost.monitor import SiteMonitor
from outpost.settings import MqttSettings
from outpost.sketch import from_wire, quantile
from outpost.topics import Topics

MAX_POINTS = 4096
"""Points one chart keeps at most, whatever ``history_s`` and the metrics interval are."""
CHART_POINTS = 600
"""Points a chart is sent at most (a chart is narrower than that in pixels): longer series are
bucketed (:meth:`Series.columns`)."""
MAX_SERIES = 64
"""Latency charts at most (service x histogram): names beyond are not drawn (counted)."""
MAX_SERVICES = 64
"""Services whose metrics are kept at most: metrics from more names are counted and left out."""
MAX_ROLLUPS = 2048
"""Rolled-up points (measurement x tags) kept from the latest windows."""


class PointLike(Protocol):
    """What the page reads of a rolled-up point (the telemetry catalog's ``Point``)."""

    @property
    def measurement(self) -> str: ...
    @property
    def tags(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def fields(self) -> Mapping[str, int | float]: ...
    @property
    def ts_ns(self) -> int: ...


@dataclass
class Series:
    """One chart's points: time (epoch s) and one or more values, oldest dropped first."""

    names: tuple[str, ...]
    points: deque[tuple[float, ...]] = field(default_factory=lambda: deque(maxlen=MAX_POINTS))

    def add(self, t: float, *values: float, keep_s: float) -> None:
        if self.points and t <= self.points[-1][0]:
            return  # out of order or repeated (a redelivered batch): the chart's x only grows
        self.points.append((t, *values))
        while self.points and self.points[0][0] < t - keep_s:
            self.points.popleft()

    def columns(self, max_points: int = CHART_POINTS) -> dict[str, list[float]]:
        """The series as uPlot's columns (``t`` then one list per value), at most ``max_points``:
        a longer one is cut into buckets that each give their last time and their largest values
        (a p99 spike or a throughput peak stays on the chart), so a poll stays small whatever
        ``history_s`` keeps."""
        points = list(self.points)
        if len(points) > max_points:
            k = -(-len(points) // max_points)
            points = [
                (b[-1][0], *(max(col) for col in list(zip(*b, strict=True))[1:]))
                for b in (points[i : i + k] for i in range(0, len(points), k))
            ]
        cols = list(zip(*points, strict=True)) if points else [()] * (1 + len(self.names))
        return {"t": list(cols[0]), **{n: list(c) for n, c in zip(self.names, cols[1:], strict=True)}}


class LiveView(SiteMonitor):
    """The site as the status page shows it, fed by its own bus (``client_id``)."""

    def __init__(self, mqtt: MqttSettings, topics: Topics, *, client_id: str, history_s: float) -> None:
        self.history_s = history_s
        self.throughput = Series(("readings_per_s", "events_per_s"))
        self.latency_series: dict[tuple[str, str], Series] = {}
        self.backlog = Series(("backlog",))
        self.last_quantiles: dict[tuple[str, str], tuple[float, float]] = {}
        """Per (service, histogram), the p50 and p99 (ms) of its latest interval with values."""
        self.ignored_metrics = 0
        """Metrics messages left out: not the contract, or from one service name too many."""
        self.series_dropped = 0
        self.rollups: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, Any]] = {}
        self._ingest_prev: tuple[int | None, int, int, int] | None = None
        self._rates: tuple[float, float] | None = None
        self._ingest_gap_s = 0.0
        super().__init__(mqtt, topics, client_id=client_id, watch_events=False)

    # --- from the broker (the bus's network thread) ---------------------------------------------
    def _on_metrics(self, msg: Message) -> None:
        try:
            batch = MetricsBatch.model_validate_json(msg.payload)
        except ValidationError:
            with self.lock:
                self.ignored_metrics += 1
            return
        with self.lock:
            known = batch.service in self.metrics
            if not known and len(self.metrics) >= MAX_SERVICES:
                self.ignored_metrics += 1
                return
        super()._on_metrics(msg)  # the monitor's latest and previous snapshot per service
        t = batch.ts / 1e9
        with self.lock:
            if batch.service == "ingest":
                self._add_throughput(batch, t)
            self._add_latency(batch, t)
            total = _backlog_total(self._uplink_streams())
            if total is not None and _is_uplink_source(batch):
                self.backlog.add(t, float(total), keep_s=self.history_s)

    def _add_throughput(self, batch: MetricsBatch, t: float) -> None:
        readings, events = batch.counters.get("readings", 0), batch.counters.get("events", 0)
        prev, self._ingest_prev = self._ingest_prev, (batch.started, batch.ts, readings, events)
        if prev is None or prev[0] != batch.started or batch.ts <= prev[1]:
            return  # the first batch of a process: no interval to take a rate over
        dt = (batch.ts - prev[1]) / 1e9
        self._rates = (max(0, readings - prev[2]) / dt, max(0, events - prev[3]) / dt)
        self._ingest_gap_s = dt
        self.throughput.add(t, *self._rates, keep_s=self.history_s)

    def _add_latency(self, batch: MetricsBatch, t: float) -> None:
        for name, wire in batch.sketches.items():
            key = (batch.service, name)
            series = self.latency_series.get(key)
            if series is None:
                if len(self.latency_series) >= MAX_SERIES:
                    self.series_dropped += 1
                    continue
                series = self.latency_series[key] = Series(("p50_ms", "p99_ms"))
            try:
                sketch = from_wire(wire)
            except ValueError:  # another relative accuracy: its bins do not line up
                continue
            if not sketch.count:
                continue
            p50, p99 = quantile(sketch, 0.5), quantile(sketch, 0.99)
            self.last_quantiles[key] = (p50, p99)
            series.add(t, p50, p99, keep_s=self.history_s)

    # --- from the telemetry service -------------------------------------------------------------
    def add_rollups(self, points: Iterable[PointLike]) -> None:
        """Keep each (measurement, tags)'s latest closed window (the SLO figures of the page)."""
        with self.lock:
            for p in points:
                key = (str(p.measurement), tuple((str(k), str(v)) for k, v in p.tags))
                if key not in self.rollups and len(self.rollups) >= MAX_ROLLUPS:
                    continue
                self.rollups[key] = {
                    "measurement": key[0],
                    "tags": dict(key[1]),
                    "fields": {str(k): float(v) for k, v in p.fields.items()},
                    "ts_ns": int(p.ts_ns),
                }

    # --- what the page and /metrics read ----------------------------------------------------------
    def _uplink_streams(self) -> dict[str, dict[str, float | None]] | None:
        """Per stream, its backlog (records) and age (s, None when not said), from the
        ``state.uplink`` of every service that reports one (the uplink service: every stream to
        the cloud, memory sync's included); None when nothing says."""
        merged: dict[str, dict[str, float | None]] | None = None
        for doc in self.metrics.values():
            up = _state(doc).get("uplink")
            if isinstance(up, dict):
                merged = merged or {}
                merged.update(
                    (str(s), {"backlog": _num(v.get("backlog")), "age_s": _num(v.get("age_s"))})
                    for s, v in up.items()
                    if isinstance(v, dict)
                )
        return merged

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, as the JSON of ``/api/live``."""
        now = time.monotonic()
        with self.lock:
            streams = self._uplink_streams()
            link = next(
                (
                    st["uplink_up"]
                    for st in map(_state, self.metrics.values())
                    if isinstance(st.get("uplink_up"), bool)
                ),
                None,
            )
            rates = self._current_rates(now)
            return {
                "site": self.topics.site,
                "now_ms": time.time_ns() // 1_000_000,
                "history_s": self.history_s,
                "broker_connected": self.bus.connected,
                "services": self._services(now),
                "throughput": {
                    "readings_per_s": None if rates is None else rates[0],
                    "events_per_s": None if rates is None else rates[1],
                    "chart": self.throughput.columns(),
                },
                "latency": [
                    {"service": s, "name": n, "chart": series.columns()}
                    for (s, n), series in sorted(self.latency_series.items())
                ],
                "dlq": self._dlq(),
                "escalations": self._escalations(),
                "uplink": {
                    "connected": link if isinstance(link, bool) else None,
                    "streams": [{"stream": k, **v} for k, v in sorted((streams or {}).items())],
                    "backlog": _backlog_total(streams),
                    "chart": self.backlog.columns(),
                },
                "rollups": sorted(
                    self.rollups.values(), key=lambda r: (r["measurement"], sorted(r["tags"].items()))
                ),
                "ignored_metrics": self.ignored_metrics,
                "series_dropped": self.series_dropped,
            }

    def _current_rates(self, now: float) -> tuple[float, float] | None:
        """Ingest's latest rates; None before two batches or once its batches stopped coming (three
        of its intervals and at least 10 s without one): a stopped ingest is not shown as busy."""
        at = self.metrics_at.get("ingest")
        if self._rates is None or at is None or now - at > max(10.0, 3 * self._ingest_gap_s):
            return None
        return self._rates

    def _services(self, now: float) -> list[dict[str, Any]]:
        out = []
        for name in sorted(set(self.status) | set(self.metrics)):
            st = self.status.get(name, {})
            doc = self.metrics.get(name, {})
            state = _state(doc)
            out.append(
                {
                    "name": name,
                    "state": _str(st.get("state")),
                    "health": _str(st.get("health")),
                    "problems": _problems(st.get("problems")),
                    "reason": _str(st.get("reason")),
                    "pid": st.get("pid") if isinstance(st.get("pid"), int) else None,
                    "version": _str(st.get("version")),
                    "metrics_age_s": round(now - self.metrics_at[name], 1)
                    if name in self.metrics_at
                    else None,
                    "messages_per_s": self._rate(name, "messages"),
                    "cpu_pct": self._cpu_pct(name),
                    "rss_mb": _num(state.get("rss_mb")),
                }
            )
        return out

    def _rate(self, name: str, counter: str) -> float | None:
        pair = self._pair(name)
        if pair is None:
            return None
        dt, before, after = pair
        n0, n1 = _int(before.get("counters", {}).get(counter)), _int(after.get("counters", {}).get(counter))
        return round(max(0, n1 - n0) / dt, 1)

    def _cpu_pct(self, name: str) -> float | None:
        pair = self._pair(name)
        if pair is None:
            return None
        dt, before, after = pair
        c0, c1 = _num(_state(before).get("cpu_s")), _num(_state(after).get("cpu_s"))
        return None if c0 is None or c1 is None else round(max(0.0, c1 - c0) / dt * 100, 1)

    def _pair(self, name: str) -> tuple[float, dict[str, Any], dict[str, Any]] | None:
        """The service's last two batches of one process and the seconds between them."""
        if name not in self.previous_metrics:
            return None
        _, before = self.previous_metrics[name]
        after = self.metrics[name]
        if before.get("started") != after.get("started"):
            return None
        dt = (after["ts"] - before["ts"]) / 1e9
        return (dt, before, after) if dt > 0 else None

    def _dlq(self) -> list[dict[str, Any]]:
        rows = []
        for name, doc in sorted(self.metrics.items()):
            for counter, n in doc.get("counters", {}).items():
                if counter.startswith("rejected.") and n:
                    reason = counter.split(".", 1)[1]
                    rows.append(
                        {"service": name, "reason": reason, "count": n, "per_s": self._rate(name, counter)}
                    )
        return sorted(rows, key=lambda r: -r["count"])

    def _escalations(self) -> dict[str, Any]:
        agents = self._agents_summary()
        waiting = sum(_int(a.get("escalations_open")) for a in agents.values())
        return {
            "waiting": waiting,
            "agents": [
                {
                    "agent": n,
                    "state": _str(a.get("state")),
                    "decisions": _int(a.get("decisions")),
                    "escalations": _int(a.get("escalations")),
                    "waiting": _int(a.get("escalations_open")),
                    "override_rate": _num(a.get("override_rate")),
                }
                for n, a in agents.items()
            ],
        }


def _is_uplink_source(batch: MetricsBatch) -> bool:
    state = batch.state or {}
    return isinstance(state.get("uplink"), dict)


def _backlog_total(streams: Mapping[str, Mapping[str, float | None]] | None) -> float | None:
    if streams is None:
        return None
    return float(sum(v.get("backlog") or 0 for v in streams.values()))


def _state(doc: Mapping[str, Any]) -> dict[str, Any]:
    state = doc.get("state")
    return state if isinstance(state, dict) else {}


def _num(v: object) -> float | None:
    """A finite number, or None (a status document is what a service says: it may say anything)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _int(v: object) -> int:
    n = _num(v)
    return int(n) if n is not None else 0


def _problems(v: object) -> list[str]:
    return [str(p)[:300] for p in v if p][:10] if isinstance(v, list) else []


def _str(v: object) -> str | None:
    return None if v is None else str(v)[:300]
