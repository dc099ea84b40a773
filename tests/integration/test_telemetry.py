"""The telemetry service as a real process, on a real broker, writing to a real VictoriaMetrics
(outpost.tsdb) through influxdb-client: the points read back are the values fed; with the store
killed the rollups spool, survive a kill -9 of the service, and arrive later with their original
timestamps; the byte budget holds, counted on the wire by the server itself; the token shows
nowhere. Windows are 1-2 s long here (``rollup_s``)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from outpost.broker import Mosquitto
from outpost.bus import Bus
from outpost.contracts import header
from outpost.datadir import site_path
from outpost.services.registry import OutpostSettings
from outpost.sketch import new_sketch, to_wire
from outpost.tsdb import VictoriaMetrics
from tests.conftest import Collector, ServiceProcess, make_event, wait_status, wait_until

pytestmark = pytest.mark.integration

TOKEN = "tok-9f3b2c-SECRET-e1d7"


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    v = VictoriaMetrics(tmp_path / "vm").start()
    yield v
    v.stop()


def telemetry(settings: OutpostSettings, vm: VictoriaMetrics, tmp_path: Path, **env: str) -> ServiceProcess:
    base = {
        "OUTPOST_SITE": settings.site,
        "OUTPOST_DATA_DIR": str(settings.data_dir),
        "OUTPOST_MQTT__PORT": str(settings.mqtt.port),
        "OUTPOST_TELEMETRY__METRICS_INTERVAL_S": "0.5",
        "OUTPOST_TELEMETRY__ROLLUP_S": "1",
        "OUTPOST_TELEMETRY__INFLUX__URL": vm.url,
        "OUTPOST_TELEMETRY__INFLUX__TOKEN": TOKEN,
        "OUTPOST_TELEMETRY__INFLUX__RETRY_MAX_S": "1",
        "OUTPOST_TELEMETRY__BUDGET_BYTES_PER_MIN": "0",
    }
    return ServiceProcess("outpost.services.telemetry", "telemetry", base | env, tmp_path / "telemetry")


class Feeder:
    """Publishes metrics batches as a service would: counters that grow, a sketch per batch."""

    def __init__(self, bus: Bus, settings: OutpostSettings, service: str) -> None:
        self.bus, self.topic, self.service = bus, settings.topics.metrics(service), service
        self.started = time.time_ns()
        self.counters: dict[str, int] = {}

    def send(self, add: dict[str, int], sketches: dict[str, list[float]] | None = None) -> None:
        for k, n in add.items():
            self.counters[k] = self.counters.get(k, 0) + n
        wires = {}
        for name, values in (sketches or {}).items():
            s = new_sketch()
            for v in values:
                s.add(v)
            wires[name] = to_wire(s)
        body = header() | {
            "service": self.service,
            "started": self.started,
            "counters": dict(self.counters),
            "histograms": {},
            "sketches": wires,
            "state": {"cpu_s": 1.0, "rss_mb": 40.0},
        }
        self.bus.publish(self.topic, orjson.dumps(body), qos=1)


def series_sum(vm: VictoriaMetrics, name: str, **labels: str) -> float:
    total = 0.0
    for s in vm.export(f'{{__name__="{name}"}}'):
        if all(s["metric"].get(k) == v for k, v in labels.items()):
            total += sum(s["values"])
    return total


def last_metrics(c: Collector) -> dict[str, Any]:
    docs = c.json()
    return docs[-1] if docs else {"counters": {}, "state": {}}


def test_points_read_back_equal_what_was_fed_and_the_token_shows_nowhere(
    broker: Mosquitto, settings: OutpostSettings, vm: VictoriaMetrics, tmp_path: Path, publisher: Bus
) -> None:
    everything = Collector(
        settings.mqtt, f"{settings.topics.root}/#", client_id="all-" + settings.site
    ).start()
    svc = telemetry(settings, vm, tmp_path, OUTPOST_TELEMETRY__RAW_DEVICE_CLASSES='["fridge"]')
    svc.start()
    try:
        wait_status(settings, "telemetry")
        # raw readings leave only for the classes the site opts in
        for dev in ("fridge-001", "scale-002"):
            publisher.publish(
                settings.topics.events(dev), orjson.dumps([make_event(dev, 1, "temp_c", 4.25)]), qos=1
            )
        ingest, agents = Feeder(publisher, settings, "ingest"), Feeder(publisher, settings, "agents")
        latencies = [0.5 + (i % 97) * 1.7 + (i % 13) * 0.31 for i in range(3000)]
        agents.send(
            {"results.triage.done": 9, "results.triage.failed": 1}, {"decision_latency.triage": latencies}
        )
        for _ in range(10):
            ingest.send({"readings.fridge": 7, "rejected.bad_json": 1})
            time.sleep(0.1)
        publisher.publish(settings.topics.metrics("bogus"), b"{not json", qos=1)
        fed = ingest.counters["readings.fridge"]
        assert wait_until(lambda: series_sum(vm, "readings_count", device_class="fridge") == fed, 20), (
            series_sum(vm, "readings_count"),
            fed,
            svc.logs(),
        )
        assert series_sum(vm, "dlq_count", service="ingest", reason="bad_json") == 10
        raw = vm.export('{__name__="reading_value"}')
        assert [(r["metric"]["device"], r["values"]) for r in raw] == [("fridge-001", [4.25])]
        assert series_sum(vm, "task_success_done", agent="triage") == 9
        assert series_sum(vm, "decision_latency_count", agent="triage") == len(latencies)
        (p99,) = vm.export('{__name__="decision_latency_p99_ms"}')
        exact = sorted(latencies)[int(0.99 * (len(latencies) - 1))]
        assert abs(p99["values"][0] - exact) / exact < 0.01
        assert p99["metric"]["site"] == settings.site
        # the window's start is the timestamp, in whole windows
        assert all(t % 1000 == 0 for t in p99["timestamps"])
        # a bad batch is a dead letter like any service's input
        assert everything.wait_for(
            lambda c: any(t == settings.topics.dlq("telemetry") for t, _ in c.messages), 10
        )
    finally:
        svc.terminate()
        svc.close()
        everything.stop()
    leaks = [t for t, p in everything.messages if TOKEN.encode() in p or TOKEN in t]
    assert not leaks
    assert TOKEN not in svc.logs()
    assert TOKEN not in "".join(p.read_text(errors="replace") for p in (tmp_path / "telemetry").glob("*.log"))


def spooled(settings: OutpostSettings) -> list[str]:
    db = site_path(settings.data_dir, settings.site, "telemetry", "spool.db")
    if not db.exists():
        return []
    con = sqlite3.connect(db)
    try:
        return [r[0] for r in con.execute("SELECT line FROM points ORDER BY seq")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def test_store_down_spools_survives_kill_9_and_writes_later_with_original_timestamps(
    broker: Mosquitto, settings: OutpostSettings, vm: VictoriaMetrics, tmp_path: Path, publisher: Bus
) -> None:
    svc = telemetry(settings, vm, tmp_path)
    svc.start()
    ingest = Feeder(publisher, settings, "ingest")
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            ingest.send({"readings.scale": 3})
            time.sleep(0.1)

    feeder = threading.Thread(target=feed, daemon=True)
    try:
        wait_status(settings, "telemetry")
        feeder.start()
        assert wait_until(lambda: series_sum(vm, "readings_count") > 0, 20), svc.logs()
        status = Collector(
            settings.mqtt, settings.topics.service_status("telemetry"), client_id="st-" + settings.site
        ).start()
        vm.kill()  # the store goes away: the service says so in its status
        assert status.wait_for(
            lambda c: any(d.get("health") == "degraded" and "spool" in str(d["problems"]) for d in c.json()),
            20,
        )
        status.stop()
        assert wait_until(lambda: sum(line.startswith("readings,") for line in spooled(settings)) >= 3, 20), (
            svc.logs()
        )
        svc.kill()  # kill -9 of the service, rollups waiting in the spool
        waiting = [line for line in spooled(settings) if line.startswith("readings,")]
        assert len(waiting) >= 3
        vm.start()  # same folder and port: the store is back
        svc.start()
        assert wait_until(lambda: not spooled(settings), 30), svc.logs()
        stop.set()
        got = {
            (s["metric"]["device_class"], t * 1_000_000): v
            for s in vm.export('{__name__="readings_count"}')
            for t, v in zip(s["timestamps"], s["values"], strict=True)
        }
        for line in waiting:  # every spooled point is in the store, at its original timestamp
            tags, fields, ts = line.split(" ")
            count = int(fields.split("count=")[1].split("i")[0])
            cls = tags.split("device_class=")[1].split(",")[0]
            assert got.get((cls, int(ts))) == count, (line, sorted(got)[-5:])
    finally:
        stop.set()
        svc.close()


def test_the_budget_holds_on_the_wire_diagnostics_give_way_and_alerts_go(
    broker: Mosquitto, settings: OutpostSettings, vm: VictoriaMetrics, tmp_path: Path, publisher: Bus
) -> None:
    per_min = 60_000  # 1000 bytes/s; the feed makes ~15 times that in diagnostics
    metrics = Collector(
        settings.mqtt, settings.topics.metrics("telemetry"), client_id="m-" + settings.site
    ).start()
    before = vm.bytes_received()
    t0 = time.monotonic()
    svc = telemetry(settings, vm, tmp_path, OUTPOST_TELEMETRY__BUDGET_BYTES_PER_MIN=str(per_min))
    svc.start()
    try:
        wait_status(settings, "telemetry")
        noisy = Feeder(publisher, settings, "noisy")
        publisher.publish(
            settings.topics.service_status("memory"),
            orjson.dumps(
                header()
                | {
                    "service": "memory",
                    "state": "offline",
                    "version": "1",
                    "config_hash": "x",
                    "pid": 1,
                    "started_ns": 1,
                    "reason": "connection lost",
                }
            ),
            qos=1,
        )
        for _ in range(40):
            noisy.send({f"c{k:03d}": 1 for k in range(200)} | {"readings.fridge": 1})
            time.sleep(0.1)
        assert wait_until(
            lambda: series_sum(vm, "alert_count", kind="service_down", service="memory") == 1, 10
        )
        assert wait_until(
            lambda: last_metrics(metrics)["counters"].get("points_downsampled.diagnostic", 0) > 0, 10
        )
        svc.terminate()
        elapsed = time.monotonic() - t0
        time.sleep(1.5)  # the server updates its byte counters about once a second
        wire = vm.bytes_received() - before
        c = last_metrics(metrics)["counters"]
    finally:
        svc.close()
        metrics.stop()
    assert c.get("points_sent.alert", 0) >= 1
    thinned, sent_diag = c["points_downsampled.diagnostic"], c.get("points_sent.diagnostic", 0)
    assert thinned > 2 * sent_diag, c  # diagnostics gave way, most of them
    assert (thinned + sent_diag) * 50 > 4 * per_min / 60 * elapsed  # unthrottled: 4x the budget at least
    # the budget: a window's burst plus the rate over the run, and our own two reads of /metrics
    assert wire <= per_min / 60 * (elapsed + 1) + 1024 + 2 * 300, (wire, elapsed, c)
    print(f"budget {per_min} B/min over {elapsed:.1f} s: {wire} bytes on the wire, counters {c}")
    assert series_sum(vm, "readings_count", device_class="fridge") > 0  # SLO points went


def test_every_series_the_dashboards_query_is_one_the_service_writes(
    broker: Mosquitto, settings: OutpostSettings, vm: VictoriaMetrics, tmp_path: Path, publisher: Bus
) -> None:
    """compose/grafana's dashboards against the real server: each service feeds what it really
    publishes (the names in docs/metrics.md), a service goes down and comes back, and then every
    `{measurement}_{field}` a dashboard's Flux names must be a series the telemetry service wrote."""
    from tests.dashboards import victoria_series

    svc = telemetry(settings, vm, tmp_path)
    svc.start()
    try:
        wait_status(settings, "telemetry")
        feeders = {n: Feeder(publisher, settings, n) for n in ("ingest", "inference", "agents", "memory")}
        status = header() | {"version": "1", "config_hash": "x", "pid": 1, "started_ns": 1}
        for state in ("online", "offline", "online"):  # one failure and its recovery
            publisher.publish(
                settings.topics.service_status("memory"),
                orjson.dumps(status | {"service": "memory", "state": state}),
                qos=1,
            )
            time.sleep(0.2)
        for _ in range(3):
            feeders["ingest"].send({"readings.fridge": 50, "rejected.bad_json": 1})
            feeders["inference"].send({"scored": 5}, {"infer.fridge.1.2.0": [0.2, 0.3, 0.9]})
            feeders["agents"].send(
                {
                    "results.triage.done": 3,
                    "results.triage.failed": 1,
                    "answered.triage": 2,
                    "overrides.triage": 1,
                    "cost_millis.triage": 40,
                    "decisions.triage.act": 4,
                    "escalations.triage": 1,
                    "breaker_opened.triage": 1,
                },
                {"decision_latency.triage": [5.0, 7.5, 20.0]},
            )
            memory = feeders["memory"]
            memory.send({"disk_full": 1})
            memory.bus.publish(
                memory.topic,
                orjson.dumps(
                    header()
                    | {
                        "service": "memory",
                        "started": memory.started,
                        "counters": dict(memory.counters),
                        "histograms": {},
                        "state": {
                            "cpu_s": 2.0,
                            "rss_mb": 80.0,
                            "uplink": {"log": {"backlog": 12, "age_s": 3.5}},
                        },
                    }
                ),
                qos=1,
            )
            time.sleep(1.0)
        wanted = victoria_series()

        def missing() -> set[str]:
            written = {s["metric"]["__name__"] for s in vm.export('{__name__=~".+"}')}
            return wanted - written

        assert wait_until(lambda: not missing(), 20), (missing(), svc.logs()[-2000:])
    finally:
        svc.terminate()
        svc.close()
