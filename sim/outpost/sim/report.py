"""What a run sent: counted per publisher process, merged into one report, shown as a table.

Counts are of what was handed to the socket (a failed publish is counted as an error, not as sent),
so a subscriber that saw everything can compare its own count to ``sent_readings`` exactly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pydantic import BaseModel, Field
from rich.console import Console, Group
from rich.table import Table


@dataclass(slots=True)
class ProfileCounts:
    """Counts of the devices of one profile in one process (merged across processes later)."""

    devices: int = 0
    readings: int = 0
    messages: int = 0
    bad: int = 0
    anomalies: int = 0


@dataclass(slots=True)
class WorkerReport:
    """What one publisher process sent. Plain dataclass: it is pickled back to the parent."""

    index: int
    devices: int = 0
    readings: int = 0
    messages: int = 0
    bad: Counter[str] = field(default_factory=Counter)
    per_profile: dict[str, ProfileCounts] = field(default_factory=dict)
    anomalies: Counter[str] = field(default_factory=Counter)
    drops: int = 0
    reconnects: int = 0
    publish_errors: int = 0
    unacked: int = 0
    elapsed_s: float = 0.0


class ProfileReport(BaseModel):
    devices: int = Field(description="Devices of this profile.")
    readings: int = Field(description="Good readings sent.")
    messages: int = Field(description="Telemetry messages sent.")
    bad: int = Field(description="Bad payloads sent.")
    anomalies: int = Field(description="Anomaly episodes started.")


class SimReport(BaseModel):
    """The result of :func:`outpost.sim.run` (and the ``--json`` line of ``outpost sim``)."""

    sent_readings: int = Field(description="Good readings published (ingest should accept each one).")
    sent_messages: int = Field(description="Telemetry messages published.")
    bad_payloads: dict[str, int] = Field(description="Bad items published, by kind (one DLQ entry each).")
    bad_total: int = Field(description="Sum of bad_payloads.")
    offered: int = Field(description="Items offered: good readings plus bad payloads.")
    per_profile: dict[str, ProfileReport] = Field(description="Counts by device profile.")
    anomalies: dict[str, int] = Field(description="Anomaly episodes started, by kind.")
    elapsed_s: float = Field(description="Sending time of the slowest process (start signal to all flushed).")
    rate: float = Field(description="Achieved items per second (offered / elapsed_s).")
    devices: int
    processes: int
    scenario: str
    seed: int
    batch: int
    qos: int
    drops: int = Field(description="Abrupt disconnects (each fires the device's last will).")
    reconnects: int = Field(description="Reconnects after a drop.")
    publish_errors: int = Field(description="Publishes the client refused (not counted as sent).")
    unacked: int = Field(description="QoS 1 publishes not acknowledged when the run ended.")
    site: str = Field("", description="The site the readings were sent to (the topics' third level).")
    broker: str = Field("", description="The broker they were sent to, HOST:PORT.")


def merge(
    parts: list[WorkerReport],
    *,
    elapsed_s: float,
    scenario: str,
    seed: int,
    batch: int,
    qos: int,
    site: str = "",
    broker: str = "",
) -> SimReport:
    """Add up the processes' counts into one report."""
    bad: Counter[str] = Counter()
    anomalies: Counter[str] = Counter()
    profiles: dict[str, ProfileCounts] = {}
    for p in parts:
        bad.update(p.bad)
        anomalies.update(p.anomalies)
        for name, c in p.per_profile.items():
            t = profiles.setdefault(name, ProfileCounts())
            t.devices += c.devices
            t.readings += c.readings
            t.messages += c.messages
            t.bad += c.bad
            t.anomalies += c.anomalies
    readings = sum(p.readings for p in parts)
    bad_total = sum(bad.values())
    offered = readings + bad_total
    return SimReport(
        sent_readings=readings,
        sent_messages=sum(p.messages for p in parts),
        bad_payloads=dict(sorted(bad.items())),
        bad_total=bad_total,
        offered=offered,
        per_profile={
            name: ProfileReport(
                devices=c.devices, readings=c.readings, messages=c.messages, bad=c.bad, anomalies=c.anomalies
            )
            for name, c in sorted(profiles.items())
        },
        anomalies=dict(sorted(anomalies.items())),
        elapsed_s=round(elapsed_s, 4),
        rate=round(offered / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        devices=sum(p.devices for p in parts),
        processes=len(parts),
        scenario=scenario,
        seed=seed,
        batch=batch,
        qos=qos,
        site=site,
        broker=broker,
        drops=sum(p.drops for p in parts),
        reconnects=sum(p.reconnects for p in parts),
        publish_errors=sum(p.publish_errors for p in parts),
        unacked=sum(p.unacked for p in parts),
    )


def render(report: SimReport, console: Console) -> None:
    """Print the report as tables for people."""
    summary = Table(title="outpost sim", show_header=False, title_justify="left")
    summary.add_column("what", style="bold")
    summary.add_column("value", justify="right")
    rows: list[tuple[str, str]] = [
        ("readings sent", f"{report.sent_readings:,}"),
        ("bad payloads sent", f"{report.bad_total:,}"),
        ("messages sent", f"{report.sent_messages:,}"),
        ("elapsed", f"{report.elapsed_s:.2f} s"),
        ("achieved rate", f"{report.rate:,.0f} items/s"),
        ("sent to", f"site {report.site!r} on broker {report.broker}"),
        ("devices / processes", f"{report.devices} / {report.processes}"),
        ("scenario / seed", f"{report.scenario} / {report.seed}"),
        ("batch / qos", f"{report.batch} / {report.qos}"),
        ("drops / reconnects", f"{report.drops} / {report.reconnects}"),
    ]
    if report.publish_errors or report.unacked:
        rows.append(("publish errors / unacked", f"{report.publish_errors} / {report.unacked}"))
    for what, value in rows:
        summary.add_row(what, value)

    profiles = Table(title="per profile", title_justify="left")
    for col in ("profile", "devices", "readings", "messages", "bad", "anomalies"):
        profiles.add_column(col, justify="left" if col == "profile" else "right")
    for name, p in report.per_profile.items():
        profiles.add_row(
            name, str(p.devices), f"{p.readings:,}", f"{p.messages:,}", f"{p.bad:,}", str(p.anomalies)
        )

    parts: list[Table] = [summary, profiles]
    if report.bad_payloads:
        bad = Table(title="bad payloads by kind", title_justify="left")
        bad.add_column("kind")
        bad.add_column("count", justify="right")
        for kind, n in report.bad_payloads.items():
            bad.add_row(kind, f"{n:,}")
        parts.append(bad)
    if report.anomalies:
        anomalies = Table(title="anomaly episodes", title_justify="left")
        anomalies.add_column("kind")
        anomalies.add_column("started", justify="right")
        for kind, n in report.anomalies.items():
            anomalies.add_row(kind, str(n))
        parts.append(anomalies)
    console.print(Group(*parts))
