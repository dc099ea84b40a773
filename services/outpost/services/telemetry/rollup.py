"""Rollups: every service's metrics batches folded into one set of points per window (``rollup_s``,
60 s by default), pure logic with the clock passed in (no thread, no I/O), like the inference
batcher, so that tests and the benchmark drive it with any clock they like.

- **Counts** are differences of the batches' counters, which are totals since the publishing
  process started (``MetricsBatch.started``): a batch with a new ``started`` (the service
  restarted) counts from 0 again, and a counter that went down without one is taken as a restart
  too. A process first seen that started before this rollup began is a baseline only (what it
  counted before is not this window's); one that started after counts all it says.
- **Quantiles** come from merging the batches' DDSketch sketches (outpost.sketch) of the window,
  never from averaging percentiles: a window's p99 is the p99 of every latency in it, to within
  the sketch's 0.5%.
- **Statuses** (retained, ``.../svc/{service}/status``, and the uplink bridge's state) give the
  ``recovery`` measurement (down, then online again: one recovery and its downtime) and the
  ``service_down`` alert.

Every measurement is defined in :mod:`.catalog`; what a batch lacks (a service without the metric,
an older version) simply makes no point.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ddsketch import DDSketch

from outpost.contracts import MetricsBatch
from outpost.services.telemetry.catalog import Point, point
from outpost.sketch import from_wire, quantile
from outpost.topics import device_class

MAX_PROCESSES = 1000
"""Publishing services a rollup tracks at most (their last counters each)."""

_DONE_STATES = frozenset(("done", "duplicate"))
"""Action result states that count as success (the agents service's own reading of them)."""


def _latency_fields(s: DDSketch) -> dict[str, int | float]:
    return {
        "count": round(s.count),
        "p50_ms": round(quantile(s, 0.50), 4),
        "p95_ms": round(quantile(s, 0.95), 4),
        "p99_ms": round(quantile(s, 0.99), 4),
        "max_ms": round(float(s._max), 4) if s.count else 0.0,
    }


@dataclass(slots=True)
class _Process:
    started: int | None
    counters: dict[str, int]
    ts_ns: int
    cpu_s: float | None


@dataclass(slots=True)
class _Window:
    start_ns: int
    counters: dict[tuple[str, str], int] = field(default_factory=dict)
    """(service, counter) -> increase in the window (present, even at 0, once a batch carried it)."""
    sketches: dict[tuple[str, str], DDSketch] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    """service -> [CPU seconds, wall seconds] between consecutive batches in the window."""
    rss: dict[str, float] = field(default_factory=dict)
    uplink: dict[str, tuple[float, float]] = field(default_factory=dict)
    downtimes: dict[str, list[float]] = field(default_factory=dict)
    alerts: dict[tuple[str, str], int] = field(default_factory=dict)
    raw: list[Point] = field(default_factory=list)


class Rollups:
    """Folds metrics batches and statuses into per-window points.

    ``add`` and ``status`` put what they get into the window holding ``now_ns`` (windows are
    aligned on multiples of ``window_s`` since the epoch, so every gateway's minutes line up);
    ``close`` hands out the points of every window that ended by ``now_ns``. ``started_ns``: when
    the rollup began (a process seen first that started before it is a baseline); None counts
    everything a process's first batch says (a benchmark that starts the processes itself)."""

    def __init__(self, site: str, window_s: float, *, started_ns: int | None = None) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.site = site
        self.window_s = float(window_s)
        self.window_ns = int(window_s * 1e9)
        self.started_ns = started_ns
        self._procs: dict[str, _Process] = {}
        self.ignored = 0
        """Batches of services past :data:`MAX_PROCESSES`, not rolled up."""
        self._windows: dict[int, _Window] = {}
        self._closed_until = 0
        self._online: dict[str, bool] = {}
        self._down_since: dict[str, int] = {}

    # --- input -----------------------------------------------------------------------------------
    def _window(self, now_ns: int) -> _Window:
        start = max(now_ns - now_ns % self.window_ns, self._closed_until)
        w = self._windows.get(start)
        if w is None:
            w = self._windows[start] = _Window(start)
        return w

    def add(self, batch: MetricsBatch, now_ns: int) -> None:
        """Fold one metrics batch in (its counters' increases since the service's previous batch,
        its sketches, its state)."""
        svc = batch.service
        prev = self._procs.get(svc)
        if prev is None and len(self._procs) >= MAX_PROCESSES:
            self.ignored += 1  # a flood of made-up service names costs nothing more
            return
        w = self._window(now_ns)
        restarted = prev is None or (batch.started is not None and batch.started != prev.started)
        baseline = (
            prev is None
            and self.started_ns is not None
            and (batch.started is None or batch.started < self.started_ns)
        )
        for name, value in batch.counters.items():
            if baseline:
                delta = 0
            elif restarted or prev is None:
                delta = value
            else:
                before = prev.counters.get(name, 0)
                delta = value - before if value >= before else value  # went down: a restart
            key = (svc, name)
            w.counters[key] = w.counters.get(key, 0) + max(delta, 0)
        for name, wire in batch.sketches.items():
            try:
                s = from_wire(wire)
            except ValueError:
                continue  # another relative accuracy: cannot be merged (the contract allows it)
            key = (svc, name)
            have = w.sketches.get(key)
            if have is None:
                w.sketches[key] = s
            else:
                have.merge(s)
        state = batch.state or {}
        cpu = _num(state.get("cpu_s"))
        if cpu is not None and prev is not None and not restarted and prev.cpu_s is not None:
            dt = (batch.ts - prev.ts_ns) / 1e9
            if dt > 0 and cpu >= prev.cpu_s:
                acc = w.cpu.setdefault(svc, [0.0, 0.0])
                acc[0] += cpu - prev.cpu_s
                acc[1] += dt
        rss = _num(state.get("rss_mb"))
        if rss is not None:
            w.rss[svc] = rss
        up = state.get("uplink")
        if isinstance(up, Mapping):
            for stream, figs in up.items():
                if isinstance(figs, Mapping):
                    backlog, age = _num(figs.get("backlog")), _num(figs.get("age_s"))
                    if backlog is not None:
                        w.uplink[str(stream)] = (backlog, age if age is not None else 0.0)
        self._procs[svc] = _Process(batch.started, dict(batch.counters), batch.ts, cpu)

    def status(self, service: str, online: bool, now_ns: int, *, alert: bool = True) -> None:
        """A service's status (or ``uplink``'s): going down raises a ``service_down`` alert (unless
        ``alert`` is False: a retained status from before, whose alert went out then) and starts
        its downtime; coming back online ends it (one recovery)."""
        was = self._online.get(service)
        self._online[service] = online
        if online:
            if was is False:
                since = self._down_since.pop(service, now_ns)
                w = self._window(now_ns)
                w.downtimes.setdefault(service, []).append(max(now_ns - since, 0) / 1e9)
            return
        if was is not False:
            self._down_since[service] = now_ns
            if alert:
                w = self._window(now_ns)
                key = ("service_down", service)
                w.alerts[key] = w.alerts.get(key, 0) + 1

    def reading(self, device: str, metric: str, value: float, ts_ns: int, now_ns: int) -> None:
        """One raw reading (only for the device classes the site lets out): a ``reading`` point at
        the reading's own time, sent with the window that holds ``now_ns``."""
        p = point(
            "reading",
            self.site,
            {"device_class": device_class(device), "device": device, "metric": metric},
            {"value": float(value)},
            ts_ns,
        )
        self._window(now_ns).raw.append(p)

    # --- output ----------------------------------------------------------------------------------
    def close(self, now_ns: int) -> list[Point]:
        """The points of every window that ended by ``now_ns``, oldest window first."""
        out: list[Point] = []
        for start in sorted(self._windows):
            if start + self.window_ns > now_ns:
                break
            out.extend(self._points(self._windows.pop(start)))
            self._closed_until = max(self._closed_until, start + self.window_ns)
        return out

    def _points(self, w: _Window) -> list[Point]:
        site, ts, win = self.site, w.start_ns, self.window_s
        out: list[Point] = []

        def add(m: str, tags: dict[str, str], fields: dict[str, int | float]) -> None:
            out.append(point(m, site, tags, fields, ts))

        alerts = dict(w.alerts)
        per_agent: dict[str, dict[str, int]] = {}
        readings: dict[str, int] = {}  # by device class, summed over the processes that count them
        for (svc, name), n in sorted(w.counters.items()):
            head, _, rest = name.partition(".")
            if name == "rejected":
                continue
            if head == "rejected" and rest:
                add("dlq", {"service": svc, "reason": rest}, {"count": n, "rate": n / win})
            elif head == "readings" and rest:
                readings[rest] = readings.get(rest, 0) + n
            elif head == "results" and "." in rest:
                agent, _, state = rest.rpartition(".")
                acc = per_agent.setdefault(agent, {})
                k = "done" if state in _DONE_STATES else "failed"
                acc[k] = acc.get(k, 0) + n
            elif head in ("answered", "overrides", "cost_millis") and rest:
                acc = per_agent.setdefault(rest, {})
                acc[head] = acc.get(head, 0) + n
            elif head == "decisions" and "." in rest:
                agent = rest.rpartition(".")[0]
                acc = per_agent.setdefault(agent, {})
                acc["decisions"] = acc.get("decisions", 0) + n
            elif head == "breaker_opened" and rest:
                if n:
                    key = ("breaker_open", svc)
                    alerts[key] = alerts.get(key, 0) + n
            elif name == "disk_full":
                if n:
                    key = ("disk_full", svc)
                    alerts[key] = alerts.get(key, 0) + n
            elif n:
                add("service_counter", {"service": svc, "name": name}, {"count": n, "rate": n / win})
        for agent, acc in sorted(per_agent.items()):
            tags = {"agent": agent}
            if "done" in acc or "failed" in acc:
                done, failed = acc.get("done", 0), acc.get("failed", 0)
                f: dict[str, int | float] = {"done": done, "failed": failed}
                if done + failed:
                    f["rate"] = done / (done + failed)
                add("task_success", tags, f)
            if "answered" in acc or "overrides" in acc:
                answered, overridden = acc.get("answered", 0), acc.get("overrides", 0)
                f = {"answered": answered, "overridden": overridden}
                if answered:
                    f["rate"] = overridden / answered
                add("overrides", tags, f)
            if "cost_millis" in acc or "decisions" in acc:
                cost, decisions = acc.get("cost_millis", 0) / 1000.0, acc.get("decisions", 0)
                f = {"cost": cost, "decisions": decisions}
                if decisions:
                    f["per_decision"] = cost / decisions
                add("cost", tags, f)
        for cls, n in sorted(readings.items()):
            add("readings", {"device_class": cls}, {"count": n, "rate": n / win})
        # SLO latencies are merged across the processes that record them (one series per model
        # and version, per agent): a window's p99 over all of them, exact to the sketch's alpha
        merged: dict[tuple[str, tuple[tuple[str, str], ...]], DDSketch] = {}
        series: tuple[str, tuple[tuple[str, str], ...]]
        for (svc, name), s in sorted(w.sketches.items()):
            head, _, rest = name.partition(".")
            if head == "infer" and rest:
                model, _, version = rest.partition(".")
                series = ("inference_latency", (("model", model), ("version", version or "-")))
            elif head == "decision_latency" and rest:
                series = ("decision_latency", (("agent", rest),))
            else:
                add("service_latency", {"service": svc, "name": name}, _latency_fields(s))
                continue
            have = merged.get(series)
            if have is None:
                merged[series] = s
            else:
                have.merge(s)
        for (m, pairs), s in merged.items():
            add(m, dict(pairs), _latency_fields(s))
        for subject, downs in sorted(w.downtimes.items()):
            add(
                "recovery",
                {"subject": subject},
                {"recoveries": len(downs), "mttr_s": sum(downs) / len(downs)},
            )
        for stream, (backlog, age) in sorted(w.uplink.items()):
            add("uplink", {"stream": stream}, {"backlog": backlog, "age_s": age})
        for (kind, svc), n in sorted(alerts.items()):
            add("alert", {"kind": kind, "service": svc}, {"count": n})
        for svc in sorted(set(w.cpu) | set(w.rss)):
            f = {}
            cpu = w.cpu.get(svc)
            if cpu is not None and cpu[1] > 0:
                f["cpu_pct"] = round(100.0 * cpu[0] / cpu[1], 3)
            if svc in w.rss:
                f["rss_mb"] = w.rss[svc]
            if f:
                add("process", {"service": svc}, f)
        out.extend(w.raw)
        return out


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def points_of(rollups: Rollups, batches: Iterable[tuple[MetricsBatch, int]], end_ns: int) -> list[Point]:
    """Fold ``(batch, arrival_ns)`` pairs and close at ``end_ns``: a helper for tests and the
    benchmark."""
    for b, t in batches:
        rollups.add(b, t)
    return rollups.close(end_ns)
