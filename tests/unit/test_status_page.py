"""The status page's app over a live view fed real metrics batches (made as the service kit makes
them: a :class:`outpost.metrics.Metrics` registry, its sketches and the envelope header), through
starlette's TestClient; hostile payloads never break it and its history stays bounded."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from outpost.broker import free_port
from outpost.bus import Message
from outpost.contracts import header
from outpost.errors import ConfigError
from outpost.metrics import Metrics
from outpost.services.telemetry.page.app import make_app
from outpost.services.telemetry.page.live import CHART_POINTS, MAX_POINTS, MAX_SERIES, MAX_SERVICES, LiveView
from outpost.services.telemetry.page.server import StatusPage
from outpost.services.telemetry.page.settings import PageSettings, page_url
from outpost.settings import CoreSettings, MqttSettings
from outpost.topics import Topics

SITE = "shop1"
STARTED = 1_700_000_000_000_000_000
T0 = 1_800_000_000_000_000_000


@dataclass(frozen=True)
class _Point:
    """A rolled-up point as the telemetry catalog's ``Point`` has it (the page reads these four)."""

    measurement: str
    tags: tuple[tuple[str, str], ...]
    fields: dict[str, int | float]
    ts_ns: int


def _msg(topic: str, payload: bytes | dict[str, Any] | list[Any]) -> Message:
    m = Message(topic=topic.encode())
    m.payload = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return m


class Site:
    """Services' metrics registries, published into a live view as the kit publishes them."""

    def __init__(self, view: LiveView) -> None:
        self.view = view
        self.topics = view.topics
        self.registries: dict[str, Metrics] = {}

    def metrics(self, service: str) -> Metrics:
        return self.registries.setdefault(service, Metrics(service))

    def publish(
        self, service: str, ts: int, state: dict[str, Any] | None = None, started: int = STARTED
    ) -> None:
        m = self.metrics(service)
        snap = m.snapshot()
        snap.update(header(ts=ts))
        snap["started"] = started
        snap["sketches"] = m.take_sketches()
        snap["state"] = {"cpu_s": ts / 1e9 * 0.1, "rss_mb": 80.5, **(state or {})}
        self.view._on_metrics(_msg(self.topics.metrics(service), snap))

    def status(self, service: str, state: str = "online", **kw: Any) -> None:
        doc = {"service": service, "state": state, "health": "ok", "problems": [], "pid": 42, **kw}
        self.view._on_status(_msg(self.topics.service_status(service), doc))


@pytest.fixture
def view() -> Iterator[LiveView]:
    # never started: the tests feed the handlers what the bus would deliver
    v = LiveView(MqttSettings(port=1), Topics(site=SITE), client_id="page-test", history_s=600)
    yield v


@pytest.fixture
def site(view: LiveView) -> Site:
    return Site(view)


@pytest.fixture
def client(view: LiveView) -> TestClient:
    return TestClient(make_app(view, PageSettings()))


def _run_site(site: Site, batches: int = 5) -> None:
    """Ingest takes 1,000 readings a second into 500 events, with latencies; memory syncs; an
    agent waits on a person; a few dead letters."""
    site.status("ingest")
    site.status("memory")
    site.status("inference", health="degraded", problems=["model x cannot load"])
    for i in range(batches):
        ts = T0 + i * 5_000_000_000
        m = site.metrics("ingest")
        m.inc("messages", 1000)
        m.inc("readings", 5000)
        m.inc("events", 2500)
        m.inc("rejected.not_json", 3)
        for ms in range(1, 101):
            m.histogram("reading_age").record_us(ms * 1000)
        site.publish("ingest", ts)
        site.metrics("memory").inc("entries", 10)
        site.publish(
            "memory",
            ts,
            {"sync_ltm": {"acked": 3, "backlog": 0}, "sync_log": {"acked": 1, "backlog": 0}},
        )
        site.publish(
            "uplink",
            ts,
            {
                "uplink_up": False,
                "uplink": {
                    "memory": {"backlog": 7 + i, "age_s": 1.5},
                    "alerts": {"backlog": 2, "age_s": 0.5},
                },
            },
        )
    agents = {
        "agents": {"restock": {"state": "running", "decisions": 9, "escalated": 4, "escalations_open": 2}}
    }
    site.view._on_agents(_msg(site.topics.control("agents", "reported"), agents))


def test_live_json_holds_what_the_site_published(site: Site, client: TestClient) -> None:
    _run_site(site)
    r = client.get("/api/live")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    live = r.json()
    assert live["site"] == SITE and live["poll_ms"] == 1000
    services = {s["name"]: s for s in live["services"]}
    assert services["ingest"]["state"] == "online" and services["ingest"]["messages_per_s"] == 200.0
    assert services["inference"]["health"] == "degraded"
    assert services["inference"]["problems"] == ["model x cannot load"]
    assert services["ingest"]["rss_mb"] == 80.5 and services["ingest"]["cpu_pct"] == 10.0
    t = live["throughput"]
    assert t["readings_per_s"] == 1000.0 and t["events_per_s"] == 500.0
    assert len(t["chart"]["t"]) == 4 and t["chart"]["readings_per_s"] == [1000.0] * 4  # a rate needs two
    (lat,) = [s for s in live["latency"] if s["service"] == "ingest"]
    assert lat["name"] == "reading_age" and len(lat["chart"]["t"]) == 5
    # each interval's own quantiles from its sketch (1..100 ms, uniform), within DDSketch's 0.5% + HDR
    assert all(abs(p - 50) / 50 < 0.02 for p in lat["chart"]["p50_ms"])
    assert all(abs(p - 99) / 99 < 0.02 for p in lat["chart"]["p99_ms"])
    assert live["dlq"] == [{"service": "ingest", "reason": "not_json", "count": 15, "per_s": 0.6}]
    assert live["escalations"]["waiting"] == 2
    assert live["escalations"]["agents"][0] == {
        "agent": "restock",
        "state": "running",
        "decisions": 9,
        "escalations": 4,
        "waiting": 2,
        "override_rate": None,
    }
    up = live["uplink"]
    assert up["connected"] is False and up["backlog"] == 13.0
    assert up["streams"] == [
        {"stream": "alerts", "backlog": 2.0, "age_s": 0.5},
        {"stream": "memory", "backlog": 11.0, "age_s": 1.5},
    ]
    assert up["chart"]["backlog"] == [9.0, 10.0, 11.0, 12.0, 13.0]
    assert live["ignored_metrics"] == 0


def test_every_services_state_uplink_is_shown_with_its_age(site: Site, client: TestClient) -> None:
    _run_site(site, batches=2)
    site.publish("telemetry", T0 + 20_000_000_000, {"uplink": {"influx": {"backlog": 120, "age_s": 33.5}}})
    up = client.get("/api/live").json()["uplink"]
    assert {"stream": "influx", "backlog": 120.0, "age_s": 33.5} in up["streams"]
    assert up["backlog"] == 120.0 + 8 + 2


def test_a_restarted_process_starts_a_new_rate(site: Site, client: TestClient) -> None:
    _run_site(site, batches=3)
    site.registries["ingest"] = Metrics("ingest")  # counters from 0 again, a new `started`
    site.metrics("ingest").inc("readings", 10)
    site.publish("ingest", T0 + 60_000_000_000, started=STARTED + 1)
    t = client.get("/api/live").json()["throughput"]
    assert min(t["chart"]["readings_per_s"]) >= 0 and len(t["chart"]["t"]) == 2  # nothing across the restart


def test_page_static_files_and_health(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for src in (
        "static/vendor/uPlot.iife.min.js",
        "static/vendor/uPlot.min.css",
        "static/page.js",
        "static/page.css",
    ):
        assert src in page.text
        r = client.get("/" + src)
        assert r.status_code == 200 and len(r.content) > 500, src
    assert "http://" not in page.text and "https://" not in page.text  # nothing off the gateway
    assert client.get("/static/vendor/uPlot.LICENSE").status_code == 200
    assert client.get("/static/../settings.py").status_code == 404
    h = client.get("/healthz")  # never started: no broker, so not healthy
    assert h.status_code == 503 and h.json() == {"ok": False, "broker_connected": False}


def test_prometheus_exposition(site: Site, view: LiveView, client: TestClient) -> None:
    _run_site(site)
    view.add_rollups(
        [
            _Point(
                "decision_latency", (("site", SITE), ("agent", "restock")), {"count": 5, "p99_ms": 12.5}, T0
            ),
            _Point("task_success", (("site", SITE), ("agent", "restock")), {"rate": 0.9}, T0),
        ]
    )
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }

    def get(name: str, /, **labels: str) -> float:
        return samples[(name, tuple(sorted({"site": SITE, **labels}.items())))]

    assert get("outpost_service_up", service="ingest") == 1.0
    assert get("outpost_service_healthy", service="inference") == 0.0
    assert get("outpost_readings_per_second") == 1000.0 and get("outpost_events_per_second") == 500.0
    assert get("outpost_service_counter_total", service="ingest", counter="readings") == 25_000
    assert get("outpost_dead_letters_total", service="ingest", reason="not_json") == 15
    assert abs(get("outpost_latency_ms", service="ingest", histogram="reading_age", quantile="0.99") - 99) < 2
    assert get("outpost_escalations_waiting", agent="restock") == 2
    assert get("outpost_uplink_backlog_records", stream="memory") == 11
    assert get("outpost_uplink_connected") == 0
    assert get("outpost_service_rss_megabytes", service="memory") == 80.5
    assert get("outpost_rollup_decision_latency_p99_ms", agent="restock") == 12.5
    assert get("outpost_rollup_task_success_rate", agent="restock") == 0.9
    assert not [k for k in samples if k[0].startswith(("process_", "python_"))]  # no global registry


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[1, 2, 3]",
        b"null",
        b'"ingest"',
        b'{"service": "ingest"}',
        b'{"v": 1, "id": "x", "ts": 1, "trace": "", "service": "ingest", "counters": {"readings": "many"}, '
        b'"histograms": {}}',
        b'{"v": 1, "id": "x", "ts": 1, "trace": "", "service": "ingest", "counters": {}, "histograms": {}, '
        b'"sketches": {"h": {"alpha": 0.01, "count": 3, "sum_ms": 1, "min_ms": 1, "max_ms": 1, '
        b'"keys": [1], "counts": [3]}}}',
        b'{"v": 1, "id": "x", "ts": 1, "trace": "", "service": "ingest", "counters": {}, "histograms": {}, '
        b'"sketches": {"h": {"alpha": 0.005, "count": 3, "sum_ms": 1, "min_ms": 1, "max_ms": 1, '
        b'"keys": [1, 2], "counts": [3]}}, '
        b'"state": {"uplink": {"s": "lots"}, "cpu_s": "x", "rss_mb": 1e400}}',
        b'{"v": 1, "id": "x", "ts": 1, "trace": "", "service": "memory", "counters": {}, "histograms": {}, '
        b'"state": {"uplink": true, "sync_x": {"backlog": "many"}}}',
    ],
)
def test_garbage_metrics_never_break_the_page(
    payload: bytes, site: Site, view: LiveView, client: TestClient
) -> None:
    _run_site(site, batches=2)
    view._on_metrics(_msg(view.topics.metrics("ingest"), payload))
    view._on_status(_msg(view.topics.service_status("ingest"), payload))
    view._on_agents(_msg(view.topics.control("agents", "reported"), payload))
    live = client.get("/api/live")
    assert live.status_code == 200
    assert client.get("/metrics").status_code == 200 and client.get("/").status_code == 200
    assert live.json()["throughput"]["readings_per_s"] == 1000.0  # what was good is still shown


def test_history_is_bounded_in_time_points_and_series(client: TestClient) -> None:
    huge = LiveView(MqttSettings(port=1), Topics(site=SITE), client_id="page-test-huge", history_s=86_400)
    site = Site(huge)
    for i in range(MAX_POINTS + 500):
        m = site.metrics("ingest")
        m.inc("readings", 10)
        m.histogram("reading_age").record_us(1000)
        site.publish("ingest", T0 + i * 1_000_000_000)
    assert len(huge.throughput.points) == MAX_POINTS
    sent = TestClient(make_app(huge, PageSettings())).get("/api/live").json()
    chart = sent["throughput"]["chart"]
    assert 0 < len(chart["t"]) <= CHART_POINTS and chart["t"][-1] == huge.throughput.points[-1][0]
    assert chart["t"] == sorted(chart["t"]) and max(chart["readings_per_s"]) == 10.0
    assert all(0 < len(s["chart"]["t"]) <= CHART_POINTS for s in sent["latency"])
    assert len(huge.latency_series[("ingest", "reading_age")].points) == MAX_POINTS
    m = site.metrics("ingest")
    for n in range(MAX_SERIES * 3):
        m.histogram(f"h{n}").record_us(500)
    site.publish("ingest", T0 + 10**13)
    assert len(huge.latency_series) == MAX_SERIES and huge.series_dropped > 0
    for n in range(MAX_SERVICES * 2):
        site.publish(f"svc{n}", T0)
    assert len(huge.metrics) == MAX_SERVICES and huge.ignored_metrics == MAX_SERVICES + 1

    short = LiveView(MqttSettings(port=1), Topics(site=SITE), client_id="page-test-short", history_s=10)
    site = Site(short)
    for i in range(100):
        site.metrics("ingest").inc("readings", 10)
        site.publish("ingest", T0 + i * 1_000_000_000)
    t = [p[0] for p in short.throughput.points]
    assert t[-1] - t[0] <= 10 and len(t) == 11
    live = TestClient(make_app(short, PageSettings())).get("/api/live").json()
    assert len(live["throughput"]["chart"]["t"]) == 11


def test_rollups_keep_the_latest_window_per_series(view: LiveView, client: TestClient) -> None:
    tags = (("site", SITE), ("agent", "a"))
    view.add_rollups([_Point("overrides", tags, {"rate": 0.5}, T0)])
    view.add_rollups([_Point("overrides", tags, {"rate": 0.25}, T0 + 60_000_000_000)])
    (r,) = client.get("/api/live").json()["rollups"]
    assert r == {
        "measurement": "overrides",
        "tags": {"site": SITE, "agent": "a"},
        "fields": {"rate": 0.25},
        "ts_ns": T0 + 60_000_000_000,
    }


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        page = StatusPage(PageSettings(port=port), CoreSettings(site=SITE))
        with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{port}.*telemetry.page.port"):
            page.start()
        page.stop()


def test_page_settings_and_url() -> None:
    assert PageSettings().port == 8787 and PageSettings().host == "127.0.0.1"
    assert page_url("0.0.0.0", 81) == "http://127.0.0.1:81/"
    assert page_url("::", 81) == "http://[::1]:81/"
    assert page_url("10.0.0.2", 81) == "http://10.0.0.2:81/"
    with pytest.raises(ValueError):
        PageSettings(port=70_000)


def test_up_picks_a_free_port_for_the_page_before_the_stack_starts() -> None:
    from outpost.cli.stack import status_page
    from outpost.services.registry import OutpostSettings

    def site_with(**page: object) -> OutpostSettings:
        return OutpostSettings.model_validate({"telemetry": {"page": page}})

    url, env = status_page(site_with(port=0))
    port = int(env["OUTPOST_TELEMETRY__PAGE__PORT"])
    assert url == f"http://127.0.0.1:{port}/" and port > 0
    free = free_port()
    assert status_page(site_with(port=free, host="0.0.0.0")) == (f"http://127.0.0.1:{free}/", {})
    assert status_page(site_with(enabled=False)) == (None, {})
    with socket.socket() as held:  # another program holds the configured port: up takes another
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        taken = held.getsockname()[1]
        url, env = status_page(site_with(port=taken))
        assert env and int(env["OUTPOST_TELEMETRY__PAGE__PORT"]) != taken
        assert url == f"http://127.0.0.1:{env['OUTPOST_TELEMETRY__PAGE__PORT']}/"


def test_a_silent_ingest_is_not_shown_as_busy(site: Site, view: LiveView, client: TestClient) -> None:
    assert client.get("/api/live").json()["throughput"]["readings_per_s"] is None  # nothing yet
    _run_site(site)
    assert client.get("/api/live").json()["throughput"]["readings_per_s"] == 1000.0
    view.metrics_at["ingest"] -= 60  # its last batch a minute ago (intervals of 5 s)
    live = client.get("/api/live").json()
    assert live["throughput"]["readings_per_s"] is None and live["throughput"]["events_per_s"] is None
    assert len(live["throughput"]["chart"]["t"]) == 4  # the history stays
    assert "outpost_readings_per_second{" not in client.get("/metrics").text
