"""Memory sync for real: an edge Mosquitto bridged to a cloud Mosquitto, the memory service and
the uplink service on the edge (memory hands its streams to the uplink's outbox), the cloud side
(``outpost cloud run``: the uplink's receiver with the memory replica) on the cloud. Long-term
memory and the log's summaries reach the cloud; the link is cut by stopping the cloud broker and
comes back; the memory service, the uplink and the cloud side are killed with SIGKILL mid-sync; old
messages are replayed. The cloud ends up holding exactly what the site holds, with nothing lost and
nothing applied twice."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from pydantic import SecretStr

from outpost.access import OPERATOR, SiteAccess
from outpost.broker import Mosquitto, uplink_bridge
from outpost.bus import Bus
from outpost.clouddb import sqlite_url
from outpost.datadir import site_path
from outpost.service import run_until
from outpost.services.memory.client import MemoryClient
from outpost.services.memory.oplog import OpLog
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


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path / "cloud-broker").start()
    yield m
    m.stop()


@pytest.fixture
def edge_settings(tmp_path: Path, site: str, cloud: Mosquitto) -> Iterator[OutpostSettings]:
    s = OutpostSettings(site=site, data_dir=tmp_path / "edge-data")
    s.uplink.cloud = cloud.address
    s.uplink.resend_s = 1.0
    edge = Mosquitto(tmp_path / "edge-broker", extra_conf=uplink_bridge(s.topics, s.uplink)).start()
    s.mqtt.port = edge.port
    s.telemetry.metrics_interval_s = 0.5
    m = s.memory
    m.summary_s, m.sync_resend_s, m.sync_batch, m.sync_window, m.commit_ms = 0.3, 1.0, 50, 400, 20
    yield s
    edge.stop()


@pytest.fixture
def uplink(edge_settings: OutpostSettings) -> Iterator[ServiceThread[Uplink]]:
    t = start_uplink(edge_settings)
    yield t
    if t.thread.is_alive():
        t.stop()


def start_uplink(settings: OutpostSettings) -> ServiceThread[Uplink]:
    t = ServiceThread(run_uplink, settings).start()
    wait_status(settings, "uplink")
    return t


@pytest.fixture
def cloud_settings(tmp_path: Path, cloud: Mosquitto) -> OutpostSettings:
    s = OutpostSettings(site="cloud", data_dir=tmp_path / "cloud-data")
    s.mqtt.port = cloud.port
    s.telemetry.metrics_interval_s = 0.5
    return s


def cloud_db(cloud_settings: OutpostSettings) -> Path:
    return Path(cloud_settings.data_dir) / "cloud.db"


def start_cloud_side(cloud_settings: OutpostSettings) -> ServiceThread[CloudUplink]:
    """What ``outpost cloud run --db sqlite:///...`` runs: the uplink's receiver, the replica's
    tables in its database."""
    url = sqlite_url(cloud_db(cloud_settings))

    def run(s: OutpostSettings, stop: threading.Event) -> CloudUplink:
        return run_until(CloudUplink(s, CloudStore(url, relay=ReplicaStore.relay_into(url))), stop)

    t = ServiceThread(run, cloud_settings).start()
    wait_status(cloud_settings, "cloud")
    return t


@pytest.fixture
def cloud_side(cloud_settings: OutpostSettings) -> Iterator[ServiceThread[CloudUplink]]:
    t = start_cloud_side(cloud_settings)
    yield t
    if t.thread.is_alive():
        t.stop()


def edge_items(settings: OutpostSettings) -> dict[int, dict[str, Any]]:
    db = sqlite3.connect(site_path(settings.data_dir, settings.site, "memory", "ltm", "vectors.db"))
    try:
        rows = db.execute("SELECT key, namespace, subject, meta, payload FROM items ORDER BY key").fetchall()
    finally:
        db.close()
    return {
        int(k): {"namespace": ns, "subject": sub, "meta": orjson.loads(meta), "payload": orjson.loads(p)}
        for k, ns, sub, meta, p in rows
    }


def edge_log(settings: OutpostSettings) -> tuple[int, int]:
    log = OpLog(site_path(settings.data_dir, settings.site, "memory", "oplog.db"), synchronous="NORMAL")
    try:
        return log.last_offset, log.count()
    finally:
        log.close()


def traces_logged(settings: OutpostSettings) -> int:
    """Distinct traces in the site's log: a message redelivered after a kill -9 (committed, not yet
    acknowledged) is logged again, so the entry count can reach a figure before everything sent is in."""
    log = OpLog(site_path(settings.data_dir, settings.site, "memory", "oplog.db"), synchronous="NORMAL")
    try:
        return int(log.db.execute("SELECT count(DISTINCT trace) FROM log").fetchone()[0])
    finally:
        log.close()


def in_cloud(
    cloud_settings: OutpostSettings, site: str
) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    store = ReplicaStore(sqlite_url(cloud_db(cloud_settings)), readonly=True)
    try:
        return store.items(site), store.summaries(site)
    finally:
        store.close()


def converged(
    edge: OutpostSettings, cloud_settings: OutpostSettings, *, logged: int = 0, timeout: float = 60.0
) -> bool:
    """The site's log holds at least ``logged`` distinct traces, and the cloud exactly the site's
    items and summaries of its whole log, back to back."""
    deadline = time.monotonic() + timeout
    while traces_logged(edge) < logged and time.monotonic() < deadline:
        time.sleep(0.1)
    while time.monotonic() < deadline:
        items, summaries = in_cloud(cloud_settings, edge.site)
        last, _ = edge_log(edge)
        to = summaries[-1]["to_offset"] if summaries else 0
        if items == edge_items(edge) and to == last:
            return True
        time.sleep(0.2)
    return False


def add_items(mem: MemoryClient, start: int, n: int, subjects: int = 3) -> None:
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        v = rng.standard_normal(384).astype(np.float32).tolist()
        mem.request(
            "ltm-add",
            {
                "namespace": "notes",
                "vector": v,
                "payload": {"n": i},
                "subject": f"s{i % subjects}",
                "meta": {"i": i},
            },
        )


def publish_events(settings: OutpostSettings, device: str, seqs: range) -> None:
    pub = Bus(settings.mqtt, client_id=f"pub-{device}-{settings.site}")
    pub.start()
    try:
        for seq in seqs:
            pub.publish(
                settings.topics.events(device),
                orjson.dumps([make_event(device, seq, "temperature", 4.0)]),
                qos=1,
            )
    finally:
        pub.stop(drain_s=5)


def check_summaries(summaries: list[dict[str, Any]], edge: OutpostSettings) -> None:
    """Back to back from offset 0 to the log's end, each entry counted once."""
    last, count = edge_log(edge)
    assert summaries[0]["from_offset"] == 0
    for a, b in itertools.pairwise(summaries):
        assert b["from_offset"] == a["to_offset"]
    assert summaries[-1]["to_offset"] == last
    assert sum(s["entries"] for s in summaries) == count
    assert sum(s["by_kind"].get("event", 0) for s in summaries) == count


def test_sync_reaches_the_cloud_through_the_uplink_and_catches_up_after_the_link_is_cut(
    edge_settings: OutpostSettings,
    cloud: Mosquitto,
    cloud_settings: OutpostSettings,
    cloud_side: ServiceThread[CloudUplink],
    uplink: ServiceThread[Uplink],
) -> None:
    """Memory hands its records to the uplink's outbox at once, link or not; the outbox holds them
    (its ``memory`` stream, in the uplink's status) until the cloud side has committed them, and
    the cloud sees only the uplink's stream, never memory's own topics."""
    up = Collector(MqttSettings(port=cloud.port), edge_settings.topics.root + "/up/#", client_id="up-tap")
    up.start()
    metrics = Collector(edge_settings.mqtt, edge_settings.topics.metrics("uplink"), client_id="m-tap")
    metrics.start()
    mem_service = ServiceThread(run_memory, edge_settings).start()
    wait_status(edge_settings, "memory")

    def uplink_state(pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first ``state`` of a metrics batch of the uplink for which ``pred`` holds."""
        assert metrics.wait_for(lambda c: any(pred(d["state"]) for d in c.json()), 30), metrics.json()[-1:]
        return next(d["state"] for d in metrics.json() if pred(d["state"]))

    with MemoryClient(edge_settings, "agent") as mem:
        add_items(mem, 0, 30)
        publish_events(edge_settings, "fridge-1", range(1, 101))
        assert converged(edge_settings, cloud_settings, logged=100)
        assert len(in_cloud(cloud_settings, edge_settings.site)[0]) == 30

        # the link goes down for real: the cloud broker stops
        cloud.stop()
        add_items(mem, 30, 30)
        assert mem.request("ltm-forget-subject", {"subject": "s1"}) == 20  # a privacy request, offline
        publish_events(edge_settings, "fridge-2", range(1, 101))

        # the site works on without the cloud: the events are logged (memory commits them a moment
        # after the broker has them, so the first look may come before)
        def logged() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = mem.request("log-trace", {"trace": "fridge-2-1"})
            return found

        assert wait_until(lambda: bool(logged()), 30) and logged()[0]["kind"] == "event"
        # the backlog is the uplink's now (memory's is handed over), and its age, in its status
        with metrics.lock:  # only what comes from now on
            metrics.messages.clear()
        down = uplink_state(
            lambda st: st["uplink"]["memory"]["backlog"] >= 2 and st["uplink"]["memory"]["age_s"] >= 1
        )
        assert down["uplink_up"] is False
        cloud.start()
        assert converged(edge_settings, cloud_settings, logged=200)
        items, summaries = in_cloud(cloud_settings, edge_settings.site)
        assert len(items) == 40 and not any(i["subject"] == "s1" for i in items.values())
        check_summaries(summaries, edge_settings)
        with metrics.lock:
            metrics.messages.clear()
        caught_up = uplink_state(lambda st: st["uplink"]["memory"]["backlog"] == 0)
        assert (
            caught_up["uplink"]["memory"] == {"backlog": 0, "age_s": 0.0} and caught_up["uplink_up"] is True
        )

        # only the uplink's stream crossed; replaying it changes nothing in the cloud
        assert up.wait_for(lambda c: len(c.messages) >= 2, 10)
        assert {t.removeprefix(edge_settings.topics.root) for t, _ in up.messages} == {"/up/uplink/memory"}
        replay = Bus(MqttSettings(port=cloud.port), client_id="replayer")
        replay.start()
        for topic, payload in list(up.messages)[:5]:
            replay.publish(topic, payload, qos=1)
        replay.stop(drain_s=5)
        time.sleep(1.0)
        assert in_cloud(cloud_settings, edge_settings.site) == (items, summaries)
    up.stop()
    metrics.stop()
    svc = mem_service.stop()
    assert svc.sync is not None
    status = svc.sync.status()
    assert status["sync_ltm"]["backlog"] == 0 and status["sync_log"]["backlog"] == 0
    assert "uplink_up" not in status  # memory's hop is local: the link is the uplink's to report
    assert uplink.stop().metrics.counters["uplink_changes"] >= 3  # up, down, up
    side = cloud_side.stop().metrics.counters
    assert side["duplicates"] >= 1 and side["rejected"] == 0


def test_sigkill_of_memory_uplink_and_cloud_side_mid_sync_loses_and_doubles_nothing(
    edge_settings: OutpostSettings, cloud: Mosquitto, cloud_settings: OutpostSettings
) -> None:
    """The memory service, the uplink service and the cloud side (``outpost cloud run``) run as
    processes; each is killed with SIGKILL while changes are going up, and restarted: memory
    resumes from what the outbox acknowledged, the uplink from what the cloud acknowledged, the
    cloud side from what it had committed."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_") or "EMBEDDER" in k}
    edge_env = {
        **base,
        "OUTPOST_SITE": edge_settings.site,
        "OUTPOST_DATA_DIR": str(edge_settings.data_dir),
        "OUTPOST_MQTT__PORT": str(edge_settings.mqtt.port),
        "OUTPOST_UPLINK__CLOUD": cloud.address,
        "OUTPOST_UPLINK__RESEND_S": "1",
        "OUTPOST_MEMORY__SUMMARY_S": "0.3",
        "OUTPOST_MEMORY__SYNC_RESEND_S": "1",
        "OUTPOST_MEMORY__SYNC_BATCH": "20",
        "OUTPOST_MEMORY__SYNC_WINDOW": "100",
        "OUTPOST_TELEMETRY__METRICS_INTERVAL_S": "0.5",
    }
    url = sqlite_url(cloud_db(cloud_settings))
    cloud_env = {**base, "OUTPOST_TELEMETRY__METRICS_INTERVAL_S": "0.5"}
    cloud_cmd = [*OUTPOST, "cloud", "run", "--db", url, "--broker", cloud.address]

    def start_service(name: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [sys.executable, "-m", f"outpost.services.{name}"], env=edge_env, stderr=subprocess.DEVNULL
        )
        wait_status(edge_settings, name, pid=p.pid)
        return p

    def start_cloud_side() -> subprocess.Popen[str]:
        p = subprocess.Popen(
            cloud_cmd, env=cloud_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        wait_status(cloud_settings, "cloud", pid=p.pid)
        return p

    def kill(p: subprocess.Popen[Any]) -> None:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)

    memory, uplink, side = start_service("memory"), start_service("uplink"), start_cloud_side()
    try:
        with MemoryClient(edge_settings, "agent") as mem:
            add_items(mem, 0, 150, subjects=7)
            publish_events(edge_settings, "till-1", range(1, 301))
            kill(memory)  # while changes are still going up
            memory = start_service("memory")
            add_items(mem, 150, 50, subjects=7)
            kill(uplink)  # the outbox's owner, mid-stream
            add_items(mem, 200, 25, subjects=7)
            uplink = start_service("uplink")
            kill(side)  # and the cloud side
            add_items(mem, 225, 25, subjects=7)
            side = start_cloud_side()
            mem.request("ltm-forget-subject", {"subject": "s3"})
            publish_events(edge_settings, "till-2", range(1, 101))
            assert converged(edge_settings, cloud_settings, logged=400)
    finally:
        for p in (memory, uplink):
            p.send_signal(signal.SIGTERM)
            p.wait(30)
        side.send_signal(signal.SIGTERM)
        out, err = side.communicate(timeout=30)
    assert side.returncode == 0, err[-2000:]
    assert "stopped:" in out and "0 refused" in out
    items, summaries = in_cloud(cloud_settings, edge_settings.site)
    assert len(items) == 250 - sum(1 for i in range(250) if i % 7 == 3)
    assert sorted(i["payload"]["n"] for i in items.values()) == [i for i in range(250) if i % 7 != 3]
    check_summaries(summaries, edge_settings)
    # what the operator sees of it
    shown = outpost("memory", "cloud", "--json", "--db", url, env=cloud_env)
    assert shown.returncode == 0, shown.stderr
    site = orjson.loads(shown.stdout.strip().splitlines()[-1])["sites"][edge_settings.site]
    assert site["items"] == len(items) and site["entries"] == edge_log(edge_settings)[1]


def test_hostile_sync_messages_and_acks_are_dead_lettered(
    edge_settings: OutpostSettings,
    cloud: Mosquitto,
    cloud_settings: OutpostSettings,
    cloud_side: ServiceThread[CloudUplink],
    uplink: ServiceThread[Uplink],
) -> None:
    """On each hop: what the uplink's outbox is handed on ``outbox/memory/+``, what the cloud side
    receives as relayed memory records, and acknowledgements memory did not ask for."""
    t = edge_settings.topics
    good = {"v": 1, "id": "x", "site": t.site, "epoch": "e1", "stream": "ltm", "prev": 0}
    edge_dlq = Collector(edge_settings.mqtt, t.dlq("uplink"), client_id="uplink-dlq").start()
    to_outbox: list[tuple[str, bytes, str]] = [
        (t.outbox("memory", "ltm"), b"{not json", "not_json"),
        (t.outbox("memory", "ltm"), b"\xff\xfe", "not_json"),
        (t.outbox("memory", "ltm"), orjson.dumps({**good, "records": "x"}), "bad_sync"),
        (
            t.outbox("memory", "ltm"),
            orjson.dumps({**good, "site": "elsewhere", "records": [[1, {}]]}),
            "bad_sync",
        ),
        (t.outbox("memory", "log"), orjson.dumps({**good, "records": [[1, {}]]}), "bad_sync"),
        (t.outbox("memory", "ltm"), b"[" * 100_000 + b"]" * 100_000, "not_json"),
    ]
    pub = Bus(edge_settings.mqtt, client_id="hostile-edge")
    pub.start()
    for topic, payload, _ in to_outbox:
        pub.publish(topic, payload, qos=1)
    assert edge_dlq.wait_for(lambda c: len(c.json()) >= len(to_outbox), 20)
    assert sorted(d["reason"] for d in edge_dlq.json()) == sorted(r for _, _, r in to_outbox)
    edge_dlq.stop()

    # relayed records the cloud side cannot apply: dead-lettered there, the stream goes on
    site = "forger"  # what lands on a site's up/ is taken as that site's (the cloud broker's ACLs guard it)
    cloud_mqtt = MqttSettings(port=cloud.port)
    cloud_dlq = Collector(cloud_mqtt, cloud_settings.topics.dlq("cloud"), client_id="cloud-dlq").start()

    def relayed(prev: int, body: dict[str, Any]) -> bytes:
        record = {"topic": "outbox/memory/ltm", "body": body}
        return orjson.dumps(
            {
                "v": 1,
                "id": "y",
                "site": site,
                "epoch": "u1",
                "stream": "memory",
                "prev": prev,
                "records": [[prev + 1, record]],
            }
        )

    ok = {"id": "r", "stream": "ltm", "epoch": "e1", "start": True}
    to_cloud: list[tuple[bytes, str]] = [
        (relayed(0, {**ok, "records": "x"}), "bad_record"),
        (relayed(1, {**ok, "stream": "secrets", "records": [[1, {}]]}), "bad_record"),
        (relayed(2, {**ok, "records": [[1, {"op": "add", "key": 1}]]}), "bad_record"),
        (relayed(3, {**ok, "records": [[1, {"op": "del", "key": 1}], [2, {"op": "nope"}]]}), "bad_record"),
    ]
    pub2 = Bus(cloud_mqtt, client_id="hostile-cloud")
    pub2.start()
    for payload, _ in to_cloud:
        pub2.publish(f"outpost/v1/{site}/up/uplink/memory", payload, qos=1)
    pub2.stop(drain_s=5)
    assert cloud_dlq.wait_for(lambda c: len(c.json()) >= len(to_cloud), 20)
    assert [d["reason"] for d in cloud_dlq.json()] == [r for _, r in to_cloud]
    cloud_dlq.stop()

    # acknowledgements memory did not ask for
    mem_service = ServiceThread(run_memory, edge_settings).start()
    wait_status(edge_settings, "memory")
    mem_dlq = Collector(edge_settings.mqtt, t.dlq("memory"), client_id="memory-dlq").start()
    acks = [
        b"nope",
        b'{"stream": "secrets", "offset": 1}',
        b'{"stream": "ltm", "offset": -1}',
        b'{"stream": "ltm", "offset": 999999}',
        b'{"stream": "ltm", "offset": "1"}',
    ]
    for a in acks:
        pub.publish(t.outbox_ack("memory", "ltm"), a, qos=1)
    pub.stop(drain_s=5)
    assert mem_dlq.wait_for(lambda c: len(c.json()) >= len(acks), 20)
    assert {d["reason"] for d in mem_dlq.json()} == {"bad_ack"}
    mem_dlq.stop()
    # and the site still syncs
    with MemoryClient(edge_settings, "agent") as mem:
        add_items(mem, 0, 5)
    assert converged(edge_settings, cloud_settings)
    assert len(in_cloud(cloud_settings, edge_settings.site)[0]) == 5
    svc = mem_service.stop()
    assert svc.bus.stats()["handler_errors"] == 0
    assert uplink.stop().rt.bus.stats()["handler_errors"] == 0
    assert cloud_side.stop().rt.bus.stats()["handler_errors"] == 0


def test_outpost_up_bridges_to_the_cloud_and_memory_arrives_there(
    cloud: Mosquitto,
    cloud_settings: OutpostSettings,
    cloud_side: ServiceThread[CloudUplink],
    tmp_path: Path,
    site: str,
) -> None:
    """What the README says: ``uplink.cloud`` set, ``outpost up``, and the site's memory reaches the
    replica of the cloud side."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_") or "EMBEDDER" in k}
    env |= {
        "OUTPOST_SITE": site,
        "OUTPOST_DATA_DIR": str(tmp_path / "site"),
        "OUTPOST_UPLINK__CLOUD": cloud.address,
        "OUTPOST_MEMORY__SUMMARY_S": "0.5",
    }
    up = subprocess.Popen(
        [*OUTPOST, "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert up.stdout is not None
        first = up.stdout.readline()
        assert f"Outpost site {site!r}: broker 127.0.0.1:" in first and f"uplink {cloud.address}" in first
        port = int(first.split("broker 127.0.0.1:")[1].split(",")[0])
        conf = site_path(tmp_path / "site", site, "mosquitto", "mosquitto.conf").read_text()
        assert f"address {cloud.address}" in conf and f"topic outpost/v1/{site}/up/# out 1" in conf
        edge = OutpostSettings(site=site, data_dir=tmp_path / "site")
        edge.mqtt.port = port
        # a program of one's own connects as the operator (docs/security.md)
        password = SiteAccess.of(site_path(edge.data_dir, site), edge.topics).known_password(OPERATOR)
        edge.mqtt.username, edge.mqtt.password = OPERATOR, SecretStr(password or "")
        wait_status(edge, "memory")
        with MemoryClient(edge, "readme") as mem:
            mem.request(
                "ltm-add",
                {"namespace": "notes", "text": "fridge 2 door seal replaced", "subject": "fridge-2"},
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not in_cloud(cloud_settings, site)[0]:
            time.sleep(0.2)
        items, _ = in_cloud(cloud_settings, site)
        assert [i["payload"] for i in items.values()] == ["fridge 2 door seal replaced"]
    finally:
        up.send_signal(signal.SIGTERM)
        out, err = up.communicate(timeout=60)
    assert up.returncode == 0, err[-2000:]
    assert "stopped cleanly" in out


def test_the_cloud_follows_a_wiped_gateway_a_paused_sync_a_full_outbox_and_its_own_lost_state(
    edge_settings: OutpostSettings, cloud_settings: OutpostSettings
) -> None:
    """The replica mirrors the site's long-term memory whatever happened in between: sync turned
    off for a while (items added then were never recorded as changes), the gateway's data wiped
    (same site id, a new memory), the outbox over its disk budget, and the cloud side's own
    database lost."""

    def phase(sync: str, start: int, n: int) -> None:
        edge_settings.memory.sync = sync  # type: ignore[assignment]
        svc = ServiceThread(run_memory, edge_settings).start()
        wait_status(edge_settings, "memory")
        with MemoryClient(edge_settings, "agent") as mem:
            add_items(mem, start, n)
        if sync != "off":
            assert converged(edge_settings, cloud_settings)
        svc.stop()

    def held() -> list[int]:
        return sorted(i["payload"]["n"] for i in in_cloud(cloud_settings, edge_settings.site)[0].values())

    side, up = start_cloud_side(cloud_settings), start_uplink(edge_settings)
    phase("auto", 0, 10)
    phase("off", 10, 5)  # not recorded for the cloud
    assert len(in_cloud(cloud_settings, edge_settings.site)[0]) == 10
    phase("auto", 15, 1)  # sync back on: the whole memory again
    assert held() == list(range(16))
    up.stop()
    shutil.rmtree(edge_settings.data_dir)  # a wiped (or replaced) gateway, same site id
    up = start_uplink(edge_settings)
    phase("auto", 100, 3)
    assert held() == [100, 101, 102]
    assert side.stop().metrics.counters["resets"] >= 1  # the new outbox's history

    # the outbox over its disk budget takes nothing of memory's: memory keeps its records (and
    # says so), the budget never cuts this stream, and it all arrives once there is room
    up.stop()
    edge_settings.uplink.max_outbox_mb = 0.000_001
    up = start_uplink(edge_settings)
    mem_metrics = Collector(edge_settings.mqtt, edge_settings.topics.metrics("memory"), client_id="mm")
    mem_metrics.start()
    svc = ServiceThread(run_memory, edge_settings).start()
    wait_status(edge_settings, "memory")
    with MemoryClient(edge_settings, "agent") as mem:
        add_items(mem, 103, 5)  # taken into the empty outbox, which is then over its budget
        time.sleep(1.0)
        assert mem.request("ltm-forget-subject", {"subject": "s1"}) == 3  # these wait at memory

    def waiting(c: Collector) -> bool:
        return any(d["state"].get("sync_ltm", {}).get("backlog", 0) >= 3 for d in c.json())

    assert mem_metrics.wait_for(waiting, 30)
    mem_metrics.stop()
    # memory's next message is refused (its backlog may be counted before it is sent): the uplink
    # says why in its status
    up_status = Collector(edge_settings.mqtt, edge_settings.topics.service_status("uplink"), client_id="us")
    up_status.start()
    assert up_status.wait_for(
        lambda c: any("disk budget" in " ".join(d.get("problems", [])) for d in c.json()), 30
    ), up_status.json()[-1:]
    up_status.stop()
    assert up.stop().metrics.counters["relay_waits"] >= 1
    edge_settings.uplink.max_outbox_mb = 500.0
    up, side = start_uplink(edge_settings), start_cloud_side(cloud_settings)
    svc.stop()
    phase("auto", 110, 1)
    kept = [n for n in [100, 101, 102, *range(103, 108), 110] if n % 3 != 1]
    assert held() == kept

    # the cloud side loses its database: the site notices and sends its memory again
    side.stop()
    for f in Path(cloud_settings.data_dir).glob("cloud.db*"):
        f.unlink()
    side = start_cloud_side(cloud_settings)
    phase("auto", 200, 2)
    assert held() == [*kept, 200, 201]
    assert side.stop().metrics.counters["unknown"] >= 1
    assert up.stop().metrics.counters["relay_forgotten"] >= 1
