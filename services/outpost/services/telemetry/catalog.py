"""The one place where the telemetry service's measurements are defined (docs/telemetry.md's table
is checked against :data:`MEASUREMENTS` by a test), and the :class:`Point` every part of the service
passes on: the rollup makes them, the budget ranks them by :class:`Priority`, the spool keeps their
line, the writer sends it and the status page draws them.

A point is written as InfluxDB line protocol (``measurement,tag=v field=1i,f=0.5 ts_ns``): the one
format that InfluxDB 2 and VictoriaMetrics (which stores field ``f`` of measurement ``m`` as series
``m_f``) both take, so what the tests read back from VictoriaMetrics is what InfluxDB 2 would hold.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Priority(enum.IntEnum):
    """What goes first when the uplink budget is short (docs/telemetry.md, "Budget"): alerts always
    go, SLO points wait in the spool, diagnostics are downsampled first."""

    ALERT = 0
    SLO = 1
    DIAGNOSTIC = 2


@dataclass(frozen=True, slots=True)
class Field:
    unit: str
    meaning: str


@dataclass(frozen=True, slots=True)
class Measurement:
    priority: Priority
    tags: tuple[str, ...]
    fields: dict[str, Field]
    meaning: str
    source: str


_LAT = {
    "count": Field("1", "latencies recorded in the window"),
    "p50_ms": Field("ms", "median, from the window's merged DDSketch"),
    "p95_ms": Field("ms", "95th percentile, from the merged sketch"),
    "p99_ms": Field("ms", "99th percentile, from the merged sketch"),
    "max_ms": Field("ms", "largest latency recorded in the window"),
}

MEASUREMENTS: dict[str, Measurement] = {
    "inference_latency": Measurement(
        Priority.SLO,
        ("model", "version"),
        dict(_LAT),
        "local inference latency per model and version",
        "inference histogram `infer.{model}.{version}` (sketches)",
    ),
    "decision_latency": Measurement(
        Priority.SLO,
        ("agent",),
        dict(_LAT),
        "end-to-end decision latency: a reading's arrival at ingest to the agent's decision",
        "agents histogram `decision_latency.{agent}` (sketches)",
    ),
    "task_success": Measurement(
        Priority.SLO,
        ("agent",),
        {
            "done": Field("1", "actions that succeeded in the window"),
            "failed": Field("1", "actions that failed in the window"),
            "rate": Field("ratio", "done / (done + failed); absent when both are 0"),
        },
        "task success rate of an agent's actions",
        "agents counters `results.{agent}.{state}`",
    ),
    "overrides": Measurement(
        Priority.SLO,
        ("agent",),
        {
            "answered": Field("1", "escalations a person answered in the window"),
            "overridden": Field("1", "answers that overrode the agent's proposal"),
            "rate": Field("ratio", "overridden / answered; absent when none was answered"),
        },
        "human override rate",
        "agents counters `answered.{agent}`, `overrides.{agent}`",
    ),
    "cost": Measurement(
        Priority.SLO,
        ("agent",),
        {
            "cost": Field("cost unit", "what the agent's decisions cost in the window"),
            "decisions": Field("1", "decisions made in the window (all kinds)"),
            "per_decision": Field("cost unit", "cost / decisions; absent without decisions"),
        },
        "cost per decision",
        "agents counters `cost_millis.{agent}` (/1000) and `decisions.{agent}.{kind}` (summed)",
    ),
    "recovery": Measurement(
        Priority.SLO,
        ("subject",),
        {
            "recoveries": Field("1", "times the subject came back online in the window"),
            "mttr_s": Field("s", "mean time from going down to being back, over those recoveries"),
        },
        "mean time to recovery after a service or link failure",
        "telemetry: retained service statuses going down (not online) and back online; "
        "subject = the service, or `uplink`",
    ),
    "dlq": Measurement(
        Priority.SLO,
        ("service", "reason"),
        {
            "count": Field("1", "inputs dead-lettered in the window"),
            "rate": Field("1/s", "count / window length"),
        },
        "dead-letter rate by reason",
        "every service's counters `rejected.{reason}`",
    ),
    "uplink": Measurement(
        Priority.SLO,
        ("stream",),
        {
            "backlog": Field("records", "records not yet acknowledged by the cloud, at the window's end"),
            "age_s": Field("s", "age of the oldest unacknowledged record"),
        },
        "uplink backlog and its age",
        "a service's metrics `state.uplink = {stream: {backlog, age_s}}`",
    ),
    "readings": Measurement(
        Priority.SLO,
        ("device_class",),
        {
            "count": Field("1", "readings ingested in the window"),
            "rate": Field("1/s", "readings per second"),
        },
        "readings per second per device class",
        "ingest counters `readings.{device_class}`",
    ),
    "alert": Measurement(
        Priority.ALERT,
        ("kind", "service"),
        {"count": Field("1", "times it happened in the window")},
        "something an operator must see: kind service_down, disk_full or breaker_open",
        "telemetry: statuses (service_down), counters `disk_full`, `breaker_opened.{agent}`",
    ),
    "process": Measurement(
        Priority.DIAGNOSTIC,
        ("service",),
        {
            "cpu_pct": Field("%", "CPU share of one core over the window"),
            "rss_mb": Field("MB", "resident memory at the window's last batch"),
        },
        "per-service CPU and memory",
        "metrics `state.cpu_s` (its rate * 100), `state.rss_mb`",
    ),
    "service_counter": Measurement(
        Priority.DIAGNOSTIC,
        ("service", "name"),
        {
            "count": Field("1", "increase of the counter in the window (sent when not 0)"),
            "rate": Field("1/s", "count / window length"),
        },
        "every other counter of every service",
        "every counter not mapped to a measurement above",
    ),
    "service_latency": Measurement(
        Priority.DIAGNOSTIC,
        ("service", "name"),
        dict(_LAT),
        "every other latency histogram of every service",
        "every histogram's sketches not mapped to a measurement above",
    ),
    "reading": Measurement(
        Priority.DIAGNOSTIC,
        ("device_class", "device", "metric"),
        {"value": Field("the reading's unit", "one raw reading")},
        "raw readings, only for the device classes in `raw_device_classes`",
        "events `.../events/{device}`; timestamp = the reading's",
    ),
}
"""Every measurement the service writes: priority, tags (besides ``site``), fields with unit and
meaning. Timestamps are the window's start (a reading's own time for ``reading``)."""


def _escape_key(s: str) -> str:
    return s.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def _escape_measurement(s: str) -> str:
    return s.replace("\\", "\\\\").replace(",", "\\,").replace(" ", "\\ ")


def _value(v: int | float) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v}i"
    return repr(float(v))


@dataclass(frozen=True, slots=True)
class Point:
    """One point of one measurement. ``tags`` include ``site``, sorted by key; ``fields`` hold only
    finite values (a rate with no denominator is left out, never NaN)."""

    measurement: str
    tags: tuple[tuple[str, str], ...]
    fields: dict[str, int | float]
    ts_ns: int
    priority: Priority

    def line(self) -> str:
        """The point in line protocol (no trailing newline). Tag values must not be empty (the
        protocol has no empty tag value): an empty one is written as ``-``."""
        head = _escape_measurement(self.measurement)
        for k, v in self.tags:
            head += f",{_escape_key(k)}={_escape_key(v) if v else '-'}"
        fields = ",".join(
            f"{_escape_key(k)}={_value(v)}"
            for k, v in self.fields.items()
            if not (isinstance(v, float) and not math.isfinite(v))
        )
        return f"{head} {fields} {self.ts_ns}"

    def tag(self, name: str) -> str:
        for k, v in self.tags:
            if k == name:
                return v
        return ""

    @property
    def series(self) -> str:
        """The measurement and its tags: one series (what downsampling keeps or thins)."""
        return self.measurement + "".join(f",{k}={v}" for k, v in self.tags)


def point(
    measurement: str, site: str, tags: dict[str, str], fields: dict[str, int | float], ts_ns: int
) -> Point:
    """A point of a catalog measurement (its priority from :data:`MEASUREMENTS`), tagged ``site``."""
    m = MEASUREMENTS[measurement]
    all_tags = {**tags, "site": site}
    return Point(
        measurement,
        tuple(sorted(all_tags.items())),
        {k: v for k, v in fields.items() if not (isinstance(v, float) and not math.isfinite(v))},
        ts_ns,
        m.priority,
    )
