"""``/metrics``: the live view in Prometheus' exposition format, through prometheus-client.

A custom collector reads :class:`LiveView` at each scrape, in a registry of its own: nothing goes
into prometheus-client's global registry (whose process metrics would be the telemetry service's,
not the site's), and a scrape costs one snapshot of what the view already holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from outpost.services.telemetry.page.live import LiveView

_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(*parts: str) -> str:
    """A Prometheus metric name from free text (a measurement, a field)."""
    return _NOT_NAME.sub("_", "_".join(parts))


class LiveCollector(Collector):
    """The site's figures, as the status page shows them (names in docs/telemetry.md, Status page)."""

    def __init__(self, view: LiveView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        live = self.view.snapshot()
        site = str(live["site"])
        yield from self._services(site, live["services"])
        yield from self._counters(site)
        for name, key, doc in (
            ("outpost_readings_per_second", "readings_per_s", "Readings/s ingest parsed (last interval)."),
            ("outpost_events_per_second", "events_per_s", "Events/s ingest published (last interval)."),
        ):
            g = GaugeMetricFamily(name, doc, labels=["site"])
            if live["throughput"][key] is not None:  # none before two batches, or once ingest is silent
                g.add_metric([site], float(live["throughput"][key]))
            yield g
        lat = GaugeMetricFamily(
            "outpost_latency_ms",
            "p50 and p99 (ms) of each service histogram's latest metrics interval (from its sketch).",
            labels=["site", "service", "histogram", "quantile"],
        )
        with self.view.lock:
            quantiles = dict(self.view.last_quantiles)
        for (service, hist), (p50, p99) in sorted(quantiles.items()):
            lat.add_metric([site, service, hist, "0.5"], p50)
            lat.add_metric([site, service, hist, "0.99"], p99)
        yield lat
        dlq = CounterMetricFamily(
            "outpost_dead_letters",
            "Inputs dead-lettered, by service and reason, since the service's process started.",
            labels=["site", "service", "reason"],
        )
        for row in live["dlq"]:
            dlq.add_metric([site, row["service"], row["reason"]], float(row["count"]))
        yield dlq
        esc = GaugeMetricFamily(
            "outpost_escalations_waiting",
            "Escalations waiting for a person, by agent (as the agent service reports).",
            labels=["site", "agent"],
        )
        for a in live["escalations"]["agents"]:
            esc.add_metric([site, a["agent"]], float(a["waiting"]))
        yield esc
        yield from self._uplink(site, live["uplink"])
        yield from self._rollups(site, live["rollups"])
        ignored = CounterMetricFamily(
            "outpost_status_page_ignored_metrics",
            "Metrics messages the status page left out (not the metrics contract).",
            labels=["site"],
        )
        ignored.add_metric([site], float(live["ignored_metrics"]))
        yield ignored

    def _services(self, site: str, services: list[dict[str, Any]]) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "outpost_service_up",
            "1 when the service's retained status says online.",
            labels=["site", "service"],
        )
        healthy = GaugeMetricFamily(
            "outpost_service_healthy", "1 when the service says its health is ok.", labels=["site", "service"]
        )
        rss = GaugeMetricFamily(
            "outpost_service_rss_megabytes",
            "Resident memory of the service's process.",
            labels=["site", "service"],
        )
        cpu = GaugeMetricFamily(
            "outpost_service_cpu_percent",
            "CPU share of the service's process between its last two metrics batches.",
            labels=["site", "service"],
        )
        for s in services:
            labels = [site, s["name"]]
            up.add_metric(labels, 1.0 if s["state"] == "online" else 0.0)
            healthy.add_metric(labels, 1.0 if s["health"] in (None, "ok") and s["state"] == "online" else 0.0)
            if s["rss_mb"] is not None:
                rss.add_metric(labels, s["rss_mb"])
            if s["cpu_pct"] is not None:
                cpu.add_metric(labels, s["cpu_pct"])
        yield from (up, healthy, rss, cpu)

    def _counters(self, site: str) -> Iterator[Metric]:
        c = CounterMetricFamily(
            "outpost_service_counter",
            "Every counter of every service's metrics batch (docs/metrics.md), since its process started.",
            labels=["site", "service", "counter"],
        )
        with self.view.lock:
            docs = {name: dict(doc.get("counters", {})) for name, doc in self.view.metrics.items()}
        for service, counters in sorted(docs.items()):
            for name, n in sorted(counters.items()):
                c.add_metric([site, service, str(name)], float(n))
        yield c

    def _uplink(self, site: str, uplink: dict[str, Any]) -> Iterator[Metric]:
        backlog = GaugeMetricFamily(
            "outpost_uplink_backlog_records",
            "Records of each uplink stream not yet acknowledged upstream.",
            labels=["site", "stream"],
        )
        age = GaugeMetricFamily(
            "outpost_uplink_age_seconds",
            "Age of each uplink stream's oldest unacknowledged record (where the service says it).",
            labels=["site", "stream"],
        )
        for s in uplink["streams"]:
            if s["backlog"] is not None:
                backlog.add_metric([site, s["stream"]], s["backlog"])
            if s["age_s"] is not None:
                age.add_metric([site, s["stream"]], s["age_s"])
        yield from (backlog, age)
        if uplink["connected"] is not None:
            link = GaugeMetricFamily(
                "outpost_uplink_connected", "1 while the uplink bridge says it is connected.", labels=["site"]
            )
            link.add_metric([site], 1.0 if uplink["connected"] else 0.0)
            yield link

    def _rollups(self, site: str, rollups: list[dict[str, Any]]) -> Iterator[Metric]:
        """The latest closed window of each rolled-up measurement, one gauge per field
        (``outpost_rollup_{measurement}_{field}``), its tags as labels."""
        families: dict[str, GaugeMetricFamily] = {}
        label_names: dict[str, list[str]] = {}
        for r in rollups:
            tags = {metric_name(k): str(v) for k, v in r["tags"].items() if k != "site"}
            for fld, value in r["fields"].items():
                name = metric_name("outpost_rollup", r["measurement"], fld)
                if name not in families:
                    label_names[name] = ["site", *sorted(tags)]
                    families[name] = GaugeMetricFamily(
                        name,
                        f"{r['measurement']}.{fld} of the latest closed rollup window (docs/telemetry.md).",
                        labels=label_names[name],
                    )
                if sorted(tags) != label_names[name][1:]:
                    continue  # a point whose tags differ from its measurement's: not one series family
                families[name].add_metric([site, *(tags[k] for k in label_names[name][1:])], value)
        yield from families.values()


def registry_for(view: LiveView) -> CollectorRegistry:
    """A registry of its own holding only the live view's collector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(LiveCollector(view))
    return reg


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
