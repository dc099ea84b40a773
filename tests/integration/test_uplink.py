"""The uplink for real: an edge Mosquitto bridged to a cloud Mosquitto (``uplink_bridge``, as
``outpost up`` writes it), the uplink service on the edge, its cloud side on the cloud broker
storing into PostgreSQL (a schema of the test's own, dropped after). Every producer topic reaches
PostgreSQL once, per-device order kept; kill -9 of either side mid-stream loses and doubles
nothing; alerts drain first after an outage and the byte cap holds on the wire; the disk budget
drops bulk, never alerts; hostile input goes to the DLQ on both sides; a site without a cloud
takes nothing."""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from outpost.broker import Mosquitto, uplink_bridge
from outpost.bus import Bus
from outpost.datadir import site_path
from outpost.service import run_until
from outpost.services.memory.client import MemoryClient
from outpost.services.memory.replica import ReplicaStore
from outpost.services.memory.service import run as run_memory
from outpost.services.registry import OutpostSettings
from outpost.services.uplink.cloud import CloudUplink
from outpost.services.uplink.service import Uplink
from outpost.services.uplink.service import run as run_uplink
from outpost.services.uplink.store import CloudStore
from outpost.settings import MqttSettings
from tests.conftest import OUTPOST, Collector, ServiceThread, make_event, outpost, wait_status, wait_until

pytestmark = pytest.mark.integration

PG = "postgresql://postgres@127.0.0.1:5432/test"
_ids = itertools.count()


@pytest.fixture
def pg_url(site: str) -> Iterator[str]:
    """A PostgreSQL schema of this test's own (dropped after): the URL points its search path there."""
    schema = f"uplink_{site}".lower()
    try:
        conn = psycopg.connect(PG, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {PG}: {exc}")
    conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    conn.execute(f"CREATE SCHEMA {schema}")
    yield f"{PG}?options=-csearch_path%3D{schema}"
    conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    conn.close()


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path / "cloud-broker").start()
    yield m
    m.stop()


@pytest.fixture
def edge(tmp_path: Path, site: str, cloud: Mosquitto) -> Iterator[OutpostSettings]:
    s = OutpostSettings(site=site, data_dir=tmp_path / "edge-data")
    s.uplink.cloud = cloud.address
    s.uplink.events = ["*"]
    s.uplink.resend_s = 1.0
    s.telemetry.metrics_interval_s = 0.3
    broker = Mosquitto(tmp_path / "edge-broker", extra_conf=uplink_bridge(s.topics, s.uplink)).start()
    s.mqtt.port = broker.port
    yield s
    broker.stop()


def cloud_settings(tmp_path: Path, cloud: Mosquitto) -> OutpostSettings:
    s = OutpostSettings(site="cloud", data_dir=tmp_path / "cloud-data")
    s.mqtt.port = cloud.port
    s.telemetry.metrics_interval_s = 0.3
    return s


def start_cloud_side(settings: OutpostSettings, url: str) -> ServiceThread[CloudUplink]:
    def run(s: OutpostSettings, stop: threading.Event) -> CloudUplink:
        return run_until(CloudUplink(s, CloudStore(url)), stop)

    t = ServiceThread(run, settings).start()
    wait_status(settings, "cloud")
    return t


def start_uplink(settings: OutpostSettings) -> ServiceThread[Uplink]:
    t = ServiceThread(run_uplink, settings).start()
    wait_status(settings, "uplink")
    return t


def held(url: str, site: str, stream: str) -> list[dict[str, Any]]:
    store = CloudStore(url, readonly=True)
    try:
        return store.records(site, stream)
    finally:
        store.close()


def publish(settings: OutpostSettings, messages: list[tuple[str, bytes]]) -> None:
    """QoS 1 from a producer of the site, each confirmed by the edge broker."""
    pub = Bus(settings.mqtt, client_id=f"producer-{next(_ids)}-{settings.site}")
    pub.start()
    try:
        for topic, payload in messages:
            pub.publish(topic, payload, qos=1)
        assert pub.drain(30)
    finally:
        pub.stop(drain_s=5)


class WireTap(Collector):
    """A collector that also notes when each message arrived (monotonic s)."""

    def __init__(self, mqtt: MqttSettings, pattern: str, *, client_id: str) -> None:
        self.stamps: list[float] = []
        super().__init__(mqtt, pattern, client_id=client_id)

    def _on(self, msg: Any) -> None:
        with self.lock:
            self.stamps.append(time.monotonic())
            self.messages.append((msg.topic, msg.payload))


def uplink_state(settings: OutpostSettings) -> Collector:
    """The uplink service's metrics batches (its ``state``: link, backlog, outbox, counters)."""
    return Collector(settings.mqtt, settings.topics.metrics("uplink"), client_id=f"m-{next(_ids)}").start()


def msg(**body: Any) -> dict[str, Any]:
    return {"v": 1, "id": f"m{next(_ids)}", "ts": time.time_ns(), "trace": "", **body}


def events(
    settings: OutpostSettings, devices: list[str], seqs: range, per: int = 10
) -> list[tuple[str, bytes]]:
    """Event batches as ingest publishes them (a JSON list of one device's events)."""
    out = []
    for start in range(seqs.start, seqs.stop, per):
        for d in devices:
            batch = [make_event(d, s, "temperature", 4.0) for s in range(start, min(start + per, seqs.stop))]
            out.append((settings.topics.events(d), orjson.dumps(batch)))
    return out


def in_order(records: list[dict[str, Any]]) -> bool:
    """Per device, seq grows with the site's offsets."""
    last: dict[str, int] = {}
    for r in records:
        if r["device"] is not None:
            if r["seq"] <= last.get(r["device"], -1):
                return False
            last[r["device"]] = r["seq"]
    return True


def test_every_producer_topic_reaches_postgresql_once_in_order(
    edge: OutpostSettings, cloud: Mosquitto, tmp_path: Path, pg_url: str
) -> None:
    edge.uplink.events = ["fridge"]  # door-1's events stay on the site
    cs = cloud_settings(tmp_path, cloud)
    side = start_cloud_side(cs, pg_url)
    up = start_uplink(edge)
    t = edge.topics
    try:
        publish(
            edge,
            [
                (t.telemetry_alerts, orjson.dumps(msg(measurement="alert", tags={"kind": "service_down"}))),
                (
                    t.decisions("a1"),
                    orjson.dumps([msg(agent="a1", kind="act"), msg(agent="a1", kind="ignore")]),
                ),
                (t.escalations("a1"), orjson.dumps(msg(agent="a1", question="?"))),
                (t.action_results("crm"), orjson.dumps(msg(key="k1", outcome="done"))),
                (t.telemetry_rollups, orjson.dumps(msg(points=[{"measurement": "m", "fields": {"x": 1}}]))),
                *events(edge, ["fridge-1", "fridge-2", "door-1"], range(0, 200)),
            ],
        )
        want = {"alerts": 1, "decisions": 3, "actions": 1, "metrics": 1, "events": 400}
        assert wait_until(lambda: all(len(held(pg_url, edge.site, s)) == n for s, n in want.items()), 60), {
            s: len(held(pg_url, edge.site, s)) for s in want
        }
        ev = held(pg_url, edge.site, "events")
        assert len({r["id"] for r in ev}) == 400
        assert in_order(ev)
        assert {r["device"] for r in ev} == {"fridge-1", "fridge-2"}
        assert held(pg_url, edge.site, "decisions")[2]["topic"] == "escalations/a1"
        # the site's outbox empties once the cloud has committed everything
        outbox = site_path(edge.data_dir, edge.site, "uplink", "outbox.db")
        assert wait_until(lambda: _outbox_count(outbox) == 0, 30)
        # outpost cloud status, the last line one JSON object
        r = outpost("cloud", "status", "--db", pg_url, "--json")
        assert r.returncode == 0, r.stderr
        st = orjson.loads(r.stdout.strip().splitlines()[-1])["sites"][edge.site]["streams"]
        assert st["events"]["records"] == 400 and st["events"]["acked"] == 400 and st["events"]["behind"] == 0
        assert st["alerts"] == {**st["alerts"], "acked": 1, "records": 1}
    finally:
        up.stop()
        side.stop()


def _outbox_count(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT count(*) FROM records").fetchone()[0])
    finally:
        db.close()


def test_kill9_of_the_uplink_and_of_the_cloud_side_mid_stream_loses_and_doubles_nothing(
    edge: OutpostSettings, cloud: Mosquitto, tmp_path: Path, pg_url: str
) -> None:
    """Both sides as processes (``python -m outpost.services.uplink``, ``outpost cloud run``),
    each killed with SIGKILL while records go up, and restarted."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
    edge_env = {
        **base,
        "OUTPOST_SITE": edge.site,
        "OUTPOST_DATA_DIR": str(edge.data_dir),
        "OUTPOST_MQTT__PORT": str(edge.mqtt.port),
        "OUTPOST_UPLINK__CLOUD": cloud.address,
        "OUTPOST_UPLINK__EVENTS": '["*"]',
        "OUTPOST_UPLINK__RESEND_S": "1",
        "OUTPOST_UPLINK__BATCH": "50",
    }
    cs = cloud_settings(tmp_path, cloud)
    cloud_env = {**base, "OUTPOST_SITE": "cloud", "OUTPOST_DATA_DIR": str(cs.data_dir)}

    def start_up() -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [sys.executable, "-m", "outpost.services.uplink"], env=edge_env, stderr=subprocess.DEVNULL
        )
        wait_status(edge, "uplink", pid=p.pid)
        return p

    def start_side() -> subprocess.Popen[bytes]:
        cmd = [*OUTPOST, "cloud", "run", "--db", pg_url, "--broker", cloud.address]
        p = subprocess.Popen(cmd, env=cloud_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_status(cs, "cloud", pid=p.pid)
        return p

    side, up = start_side(), start_up()
    devices = ["fridge-1", "fridge-2", "oven-1", "door-1"]
    try:
        msgs = events(edge, devices, range(0, 2500))  # 10,000 records
        publish(edge, msgs[:300])
        os.kill(up.pid, signal.SIGKILL)  # records taken, some committed, some not acknowledged
        up.wait()
        publish(edge, msgs[300:600])  # the broker keeps them for the uplink's durable session
        up = start_up()
        assert wait_until(lambda: len(held(pg_url, edge.site, "events")) > 2000, 60)
        os.kill(side.pid, signal.SIGKILL)  # the cloud side, mid-stream
        side.wait()
        publish(edge, msgs[600:])
        side = start_side()
        assert wait_until(lambda: len(held(pg_url, edge.site, "events")) == 10_000, 90), len(
            held(pg_url, edge.site, "events")
        )
        ev = held(pg_url, edge.site, "events")
        assert len({r["id"] for r in ev}) == 10_000  # each once (a record taken twice: dropped by id)
        assert in_order(ev)
        for d in devices:
            assert sorted(r["seq"] for r in ev if r["device"] == d) == list(range(2500))
    finally:
        for p in (up, side):
            if p.poll() is None:
                p.terminate()
                p.wait(15)


def test_alerts_drain_first_after_an_outage_and_the_cap_holds_on_the_wire(
    edge: OutpostSettings, cloud: Mosquitto, tmp_path: Path, pg_url: str
) -> None:
    cap = 100_000
    edge.uplink.max_bytes_s = cap
    cs = cloud_settings(tmp_path, cloud)
    side = start_cloud_side(cs, pg_url)
    up = start_uplink(edge)
    t = edge.topics
    metrics = uplink_state(edge)
    try:
        cloud.stop()  # the link goes down
        assert metrics.wait_for(lambda c: any(d["state"].get("uplink_up") is False for d in c.json()))
        bulk = events(edge, ["fridge-1", "fridge-2"], range(0, 2000), per=50)  # about 0.8 MB
        publish(edge, bulk)
        publish(edge, [(t.decisions("a1"), orjson.dumps(msg(agent="a1", kind="act"))) for _ in range(20)])
        publish(edge, [(t.telemetry_alerts, orjson.dumps(msg(measurement="alert"))) for _ in range(20)])
        outbox = site_path(edge.data_dir, edge.site, "uplink", "outbox.db")
        assert wait_until(lambda: _outbox_count(outbox) == 4040, 30)
        cloud.start()
        wire = WireTap(MqttSettings(port=cloud.port), f"{edge.prefix}/v1/+/up/uplink/+", client_id="wire-tap")
        wire.start()
        try:
            assert wait_until(lambda: len(held(pg_url, edge.site, "events")) == 4000, 60)
        finally:
            wire.stop()
        first = {
            s: min(r["received"] for r in _received(pg_url, edge.site, s))
            for s in ("alerts", "decisions", "events")
        }
        last_alert = max(r["received"] for r in _received(pg_url, edge.site, "alerts"))
        assert last_alert <= first["decisions"] <= first["events"], first
        # the cap on the wire: bytes the cloud broker delivered (topic and payload), after the first message
        sizes = [(len(tp) + len(p)) for tp, p in wire.messages]
        stamps = wire.stamps
        rate = sum(sizes[1:]) / (stamps[-1] - stamps[0])
        print(f"uplink catch-up on the wire: {rate:,.0f} B/s, cap {cap:,} B/s, {len(sizes)} messages")
        assert cap * 0.5 <= rate <= cap * 1.05, rate
    finally:
        metrics.stop()
        up.stop()
        side.stop()


def _received(url: str, site: str, stream: str) -> list[dict[str, Any]]:
    conn = psycopg.connect(url, autocommit=True)
    try:
        rows = conn.execute(
            "SELECT received_ns FROM records WHERE site = %s AND stream = %s", (site, stream)
        ).fetchall()
        return [{"received": int(r[0])} for r in rows]
    finally:
        conn.close()


def test_the_disk_budget_drops_the_oldest_bulk_never_alerts(edge: OutpostSettings, cloud: Mosquitto) -> None:
    """The link is down; the outbox goes over ``max_outbox_mb``: events go first, oldest first,
    counted; alerts stay, also when they alone are over the budget."""
    edge.uplink.max_outbox_mb = 0.05
    cloud.stop()
    up = start_uplink(edge)
    t = edge.topics
    metrics = uplink_state(edge)
    try:
        publish(edge, events(edge, ["fridge-1"], range(0, 400)))  # about 80 kB of events
        publish(
            edge,
            [(t.action_results("crm"), orjson.dumps(msg(key=f"k{i}", outcome="done"))) for i in range(5)],
        )
        outbox = site_path(edge.data_dir, edge.site, "uplink", "outbox.db")
        assert metrics.wait_for(
            lambda c: any(d["counters"].get("uplink_dropped.events", 0) > 0 for d in c.json()), 30
        )
        assert wait_until(lambda: [s for s, _ in _outbox_rows(outbox)].count("actions") == 5, 30)
        kept = _outbox_rows(outbox)
        ev = [o for s, o in kept if s == "events"]
        assert ev and ev == sorted(ev) and min(ev) > 1  # the oldest went
        assert [s for s, _ in kept].count("actions") == 5
        big = "x" * 2000
        publish(
            edge, [(t.telemetry_alerts, orjson.dumps(msg(measurement="alert", note=big))) for _ in range(40)]
        )
        # everything else gives way (the commit that brings the last alerts is followed by the drops)
        assert wait_until(lambda: {s for s, _ in _outbox_rows(outbox)} == {"alerts"}, 30), _outbox_rows(
            outbox
        )
        assert wait_until(lambda: len(_outbox_rows(outbox)) == 40, 30)  # no alert did
        with metrics.lock:
            metrics.messages.clear()
        assert metrics.wait_for(lambda c: any(d["state"].get("outbox_over_budget") for d in c.json()), 30)
        last = metrics.json()[-1]
        assert last["counters"].get("uplink_dropped.actions") == 5
        assert "uplink_dropped.alerts" not in last["counters"]
        # and the operator sees it: outpost status, its table and its JSON
        shown = outpost(
            "status", "--broker", f"127.0.0.1:{edge.mqtt.port}", "--site", edge.site, "--wait", "2", "--json"
        )
        assert shown.returncode == 0, shown.stderr
        box = orjson.loads(shown.stdout.strip().splitlines()[-1])["uplink"]["outbox"]
        assert box["over_budget"] is True and box["budget_bytes"] == 50_000 and box["records"] == 40
        assert (
            box["dropped"]["actions"] == 5 and box["dropped"]["events"] > 0 and "alerts" not in box["dropped"]
        )
        assert "over budget" in shown.stdout and "dropped: " in shown.stdout
    finally:
        metrics.stop()
        up.stop()


def _outbox_rows(path: Path) -> list[tuple[str, int]]:
    db = sqlite3.connect(path)
    try:
        return [
            (str(s), int(o))
            for s, o in db.execute('SELECT stream, "offset" FROM records ORDER BY stream, "offset"')
        ]
    finally:
        db.close()


def test_hostile_input_is_dead_lettered_on_both_sides(
    edge: OutpostSettings, cloud: Mosquitto, tmp_path: Path, pg_url: str
) -> None:
    edge.uplink.max_record_bytes = 10_000
    cs = cloud_settings(tmp_path, cloud)
    side = start_cloud_side(cs, pg_url)
    up = start_uplink(edge)
    t = edge.topics
    edge_dlq = Collector(edge.mqtt, t.dlq("uplink"), client_id="edge-dlq").start()
    cloud_dlq = Collector(cs.mqtt, cs.topics.dlq("cloud"), client_id="cloud-dlq").start()
    try:
        bad = [
            b"not json",
            b"[]",
            b'{"no": "id"}',
            b"[1, 2]",
            b'{"id": 7}',
            orjson.dumps(msg(pad="x" * 20_000)),
        ]
        publish(edge, [(t.decisions("a1"), b) for b in bad])
        publish(edge, [(t.decisions("a1"), orjson.dumps(msg(agent="a1", kind="act")))])  # not blocked
        assert edge_dlq.wait_for(lambda c: len(c.json()) == len(bad), 30), edge_dlq.json()
        assert sorted(d["reason"] for d in edge_dlq.json()) == sorted(
            ["not_json", "wrong_shape", "wrong_shape", "wrong_shape", "wrong_shape", "too_large"]
        )
        assert wait_until(lambda: len(held(pg_url, edge.site, "decisions")) == 1, 30)

        # on the cloud broker: what no site's uplink would send
        root = f"{edge.prefix}/v1/{edge.site}/up/uplink"
        good = {"v": 1, "id": "x", "site": edge.site, "epoch": "e1", "stream": "alerts", "prev": 0}
        hostile = [
            (f"{root}/alerts", b"{nope"),
            (f"{root}/alerts", orjson.dumps({**good, "prev": "zero", "records": [[1, {}]]})),
            (f"{root}/alerts", orjson.dumps({**good, "site": "other", "records": [[1, {}]]})),
            (f"{root}/bogus", orjson.dumps({**good, "stream": "bogus", "records": [[1, {}]]})),
            (
                f"{edge.prefix}/v1/a.b/up/uplink/alerts",
                orjson.dumps({**good, "site": "a.b", "records": [[1, {}]]}),
            ),
        ]
        feed = Bus(cs.mqtt, client_id="hostile")
        feed.start()
        try:
            for topic, payload in hostile:
                feed.publish(topic, payload, qos=1)
            # a record without an id, then a good one, in one message of a new site: the first is
            # refused alone, the stream goes on
            rec = {"topic": "telemetry/alerts", "body": msg(measurement="alert")}
            feed.publish(
                f"{edge.prefix}/v1/other/up/uplink/alerts",
                orjson.dumps(
                    {**good, "site": "other", "records": [[1, {"topic": "x", "body": {}}], [2, rec]]}
                ),
                qos=1,
            )
            assert feed.drain(10)
        finally:
            feed.stop(drain_s=2)
        assert cloud_dlq.wait_for(lambda c: len(c.json()) == len(hostile) + 1, 30), cloud_dlq.json()
        reasons = sorted(d["reason"] for d in cloud_dlq.json())
        assert reasons == sorted(
            ["not_json", "bad_batch", "bad_batch", "bad_batch", "bad_batch", "bad_record"]
        )
        assert wait_until(lambda: len(held(pg_url, "other", "alerts")) == 1, 30)
        assert len(held(pg_url, edge.site, "alerts")) == 0
    finally:
        edge_dlq.stop()
        cloud_dlq.stop()
        up.stop()
        side.stop()


def test_without_a_cloud_the_uplink_takes_nothing(edge: OutpostSettings) -> None:
    edge.uplink.cloud = ""
    metrics = uplink_state(edge)
    up = start_uplink(edge)
    try:
        publish(edge, [(edge.topics.decisions("a1"), orjson.dumps(msg(agent="a1", kind="act")))])
        assert metrics.wait_for(lambda c: any("uplink_idle" in d["state"] for d in c.json()), 30)
        assert not site_path(edge.data_dir, edge.site, "uplink", "outbox.db").exists()
        taken = [
            k for d in metrics.json() for k in d["counters"] if k.startswith(("taken_messages", "uplink_"))
        ]
        assert taken == []
    finally:
        metrics.stop()
        up.stop()


def test_outpost_cloud_run_stores_the_uplink_and_memory_sync_in_one_database(
    edge: OutpostSettings, cloud: Mosquitto, tmp_path: Path, pg_url: str
) -> None:
    """One process receives every stream of the site into PostgreSQL: the uplink's records and
    memory sync's long-term memory; a SIGTERM stops it cleanly; ``outpost cloud status`` lists
    both. The same on SQLite for a single site is the link-fault tests' cloud side."""
    cs = cloud_settings(tmp_path, cloud)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
    env.update(OUTPOST_SITE="cloud", OUTPOST_DATA_DIR=str(cs.data_dir))
    cmd = [*OUTPOST, "cloud", "run", "--db", pg_url, "--broker", cloud.address]
    side = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_status(cs, "cloud", pid=side.pid)
        up, memory = start_uplink(edge), ServiceThread(run_memory, edge).start()
        try:
            wait_status(edge, "memory")
            publish(edge, [(edge.topics.decisions("a1"), orjson.dumps(msg(agent="a1", kind="act")))])
            with MemoryClient(edge, "agent") as mem:
                for i in range(3):
                    mem.request(
                        "ltm-add", {"namespace": "notes", "vector": [float(i + 1)] * 384, "payload": {"n": i}}
                    )
            assert wait_until(lambda: len(held(pg_url, edge.site, "decisions")) == 1, 30)
            assert wait_until(lambda: len(replica_items(pg_url, edge.site)) == 3, 30)
        finally:
            memory.stop()
            up.stop()
    finally:
        side.send_signal(signal.SIGTERM)
        out, err = side.communicate(timeout=30)
    assert side.returncode == 0, err[-2000:]
    assert "records stored, 0 duplicates, 0 refused" in out, out
    assert sorted(it["payload"]["n"] for it in replica_items(pg_url, edge.site).values()) == [0, 1, 2]
    r = outpost("cloud", "status", "--db", pg_url, "--json")
    assert r.returncode == 0, r.stderr
    streams = orjson.loads(r.stdout.strip().splitlines()[-1])["sites"][edge.site]["streams"]
    assert streams["decisions"]["acked"] == 1
    assert streams["memory/ltm"] == {"acked": 3, "records": 3}
    assert streams["memory"]["acked"] >= 1 and streams["memory"]["records"] is None  # the carrier
    assert "ltm" not in streams
    r = outpost("cloud", "status", "--db", pg_url)
    assert r.returncode == 0 and edge.site in r.stdout and "memory/ltm" in r.stdout


def replica_items(url: str, site: str) -> dict[int, dict[str, Any]]:
    store = ReplicaStore(url, readonly=True)
    try:
        return store.items(site)
    finally:
        store.close()


def test_the_cloud_side_rides_out_a_lost_database_connection(
    edge: OutpostSettings, cloud: Mosquitto, tmp_path: Path, pg_url: str
) -> None:
    """PostgreSQL drops the cloud side's connection: the message then is left unanswered (no dead
    letter), the site sends it again, a new connection stores it; nothing lost."""
    app = f"uplink-cloud-{edge.site}"
    cs = cloud_settings(tmp_path, cloud)
    side = start_cloud_side(cs, f"{pg_url}&application_name={app}")
    up = start_uplink(edge)
    metrics = Collector(cs.mqtt, cs.topics.metrics("cloud"), client_id="cloud-metrics").start()
    dlq = Collector(cs.mqtt, cs.topics.dlq("cloud"), client_id="cloud-dlq").start()
    decide = edge.topics.decisions("a1")
    try:
        publish(edge, [(decide, orjson.dumps(msg(agent="a1", kind="act")))])
        assert wait_until(lambda: len(held(pg_url, edge.site, "decisions")) == 1, 30)
        with psycopg.connect(PG, autocommit=True) as admin:
            gone = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (app,)
            ).fetchall()
        assert gone == [(True,)]
        publish(edge, [(decide, orjson.dumps(msg(agent="a1", kind="act")))])
        assert wait_until(lambda: len(held(pg_url, edge.site, "decisions")) == 2, 30)
        assert metrics.wait_for(lambda c: any(d["counters"].get("db_errors", 0) >= 1 for d in c.json()), 10)
        assert dlq.json() == []
    finally:
        metrics.stop()
        dlq.stop()
        up.stop()
        side.stop()
