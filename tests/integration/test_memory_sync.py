"""Memory sync for real: an edge Mosquitto bridged to a cloud Mosquitto (the uplink), the memory
service on the edge, the replica on the cloud. Long-term memory and the log's summaries reach the
cloud; the link is cut by stopping the cloud broker and comes back; the memory service is killed
with SIGKILL mid-sync; old messages are replayed. The cloud ends up holding exactly what the site
holds, with nothing lost and nothing applied twice."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
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
from outpost.services.memory.client import MemoryClient
from outpost.services.memory.oplog import OpLog
from outpost.services.memory.replica import CloudReplica, ReplicaStore
from outpost.services.memory.replica import run as run_replica
from outpost.services.memory.service import run as run_memory
from outpost.services.registry import OutpostSettings
from outpost.settings import MqttSettings
from tests.conftest import OUTPOST, Collector, ServiceThread, make_event, outpost, wait_status

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
    edge = Mosquitto(tmp_path / "edge-broker", extra_conf=uplink_bridge(s.topics, s.uplink)).start()
    s.mqtt.port = edge.port
    s.telemetry.metrics_interval_s = 0.5
    m = s.memory
    m.summary_s, m.sync_resend_s, m.sync_batch, m.sync_window, m.commit_ms = 0.3, 1.0, 50, 400, 20
    yield s
    edge.stop()


@pytest.fixture
def replica(
    tmp_path: Path, cloud: Mosquitto
) -> Iterator[tuple[OutpostSettings, ServiceThread[CloudReplica]]]:
    s = OutpostSettings(site="cloud", data_dir=tmp_path / "cloud-data")
    s.mqtt.port = cloud.port
    r = ServiceThread(run_replica, s).start()
    wait_status(s, "replica")
    yield s, r
    if r.thread.is_alive():
        r.stop()


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
    store = ReplicaStore(sqlite_url(Path(cloud_settings.data_dir) / "replica.db"), readonly=True)
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


@pytest.mark.parametrize("mode", ["uplink", "always"])
def test_sync_reaches_the_cloud_and_catches_up_after_the_link_is_cut(
    edge_settings: OutpostSettings,
    cloud: Mosquitto,
    replica: tuple[OutpostSettings, ServiceThread[CloudReplica]],
    mode: str,
) -> None:
    """``uplink``: nothing is sent while the bridge reports the link down. ``always``: the site
    keeps sending into the edge broker's queue for the bridge and resends what goes unacknowledged,
    so the cloud sees old, repeated and out-of-order messages when the link returns."""
    cloud_settings, _ = replica
    edge_settings.memory.sync = mode  # type: ignore[assignment]
    up = Collector(
        MqttSettings(port=cloud.port), edge_settings.topics.root + "/up/memory/+", client_id="up-tap"
    )
    up.start()
    metrics = Collector(edge_settings.mqtt, edge_settings.topics.metrics("memory"), client_id="m-tap")
    metrics.start()
    mem_service = ServiceThread(run_memory, edge_settings).start()
    wait_status(edge_settings, "memory")

    def uplink(pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first ``state`` of a metrics batch of memory for which ``pred`` holds."""
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
        time.sleep(1.5)
        status = mem.request("log-trace", {"trace": "fridge-2-1"})
        assert status and status[0]["kind"] == "event"  # the site works on without the cloud
        # the backlog the cloud has not acknowledged, and its age, in the metrics state
        with metrics.lock:  # only what comes from now on
            metrics.messages.clear()
        down = uplink(lambda st: st["uplink"]["ltm"]["backlog"] >= 50 and st["uplink"]["ltm"]["age_s"] >= 1)
        assert down["sync_ltm"]["backlog"] == down["uplink"]["ltm"]["backlog"]
        if mode == "uplink":
            assert down["uplink_up"] is False
        cloud.start()
        assert converged(edge_settings, cloud_settings, logged=200)
        items, summaries = in_cloud(cloud_settings, edge_settings.site)
        assert len(items) == 40 and not any(i["subject"] == "s1" for i in items.values())
        check_summaries(summaries, edge_settings)
        with metrics.lock:  # only what comes from now on
            metrics.messages.clear()
        caught_up = uplink(lambda st: all(v["backlog"] == 0 for v in st["uplink"].values()))
        nothing = {"backlog": 0, "age_s": 0.0}
        assert caught_up["uplink"] == {"ltm": nothing, "log": nothing}
        assert caught_up["uplink_up"] is True

        # replaying what went up changes nothing in the cloud
        assert up.wait_for(lambda c: len(c.messages) >= 2, 10)
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
    c = svc.metrics.counters
    if mode == "uplink":
        assert c["uplink_changes"] >= 3  # up, down, up
    else:
        assert c["sync_resends"] >= 1  # nothing acknowledged while the cloud was away
    assert svc.sync is not None  # sync is on in every mode here
    status = svc.sync.status()
    assert status["sync_ltm"]["backlog"] == 0 and status["sync_log"]["backlog"] == 0
    rep: CloudReplica = replica[1].stop()
    assert rep.metrics.counters["duplicates"] >= 1 and rep.metrics.counters["rejected"] == 0


def test_sigkill_on_either_side_mid_sync_loses_and_doubles_nothing(
    edge_settings: OutpostSettings, cloud: Mosquitto, tmp_path: Path
) -> None:
    """The memory service and the replica (``outpost memory replica``) run as processes; each is
    killed with SIGKILL while changes are going up, and restarted: the site resumes from the last
    offset the cloud acknowledged, the replica from what it had committed."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_") or "EMBEDDER" in k}
    edge_env = {
        **base,
        "OUTPOST_SITE": edge_settings.site,
        "OUTPOST_DATA_DIR": str(edge_settings.data_dir),
        "OUTPOST_MQTT__PORT": str(edge_settings.mqtt.port),
        "OUTPOST_UPLINK__CLOUD": cloud.address,
        "OUTPOST_MEMORY__SUMMARY_S": "0.3",
        "OUTPOST_MEMORY__SYNC_RESEND_S": "1",
        "OUTPOST_MEMORY__SYNC_BATCH": "20",
        "OUTPOST_MEMORY__SYNC_WINDOW": "100",
        "OUTPOST_TELEMETRY__METRICS_INTERVAL_S": "0.5",
    }
    cloud_settings = OutpostSettings(site="cloud", data_dir=tmp_path / "cloud-data")
    cloud_settings.mqtt.port = cloud.port
    cloud_env = {**base, "OUTPOST_SITE": "cloud", "OUTPOST_TELEMETRY__METRICS_INTERVAL_S": "0.5"}
    replica_cmd = [
        *OUTPOST,
        "memory",
        "replica",
        "--broker",
        cloud.address,
        "--data-dir",
        str(cloud_settings.data_dir),
    ]

    def start_memory() -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [sys.executable, "-m", "outpost.services.memory"], env=edge_env, stderr=subprocess.DEVNULL
        )
        wait_status(edge_settings, "memory", pid=p.pid)
        return p

    def start_replica() -> subprocess.Popen[str]:
        p = subprocess.Popen(
            replica_cmd, env=cloud_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        wait_status(cloud_settings, "replica", pid=p.pid)
        return p

    memory, replica = start_memory(), start_replica()
    try:
        with MemoryClient(edge_settings, "agent") as mem:
            add_items(mem, 0, 150, subjects=7)
            publish_events(edge_settings, "till-1", range(1, 301))
            os.kill(memory.pid, signal.SIGKILL)  # while changes are still going up
            memory.wait(10)
            memory = start_memory()
            add_items(mem, 150, 50, subjects=7)
            os.kill(replica.pid, signal.SIGKILL)  # and the cloud side, mid-stream
            replica.wait(10)
            add_items(mem, 200, 50, subjects=7)
            replica = start_replica()
            mem.request("ltm-forget-subject", {"subject": "s3"})
            publish_events(edge_settings, "till-2", range(1, 101))
            assert converged(edge_settings, cloud_settings, logged=400)
    finally:
        memory.send_signal(signal.SIGTERM)
        memory.wait(30)
        replica.send_signal(signal.SIGTERM)
        out, err = replica.communicate(timeout=30)
    assert replica.returncode == 0, err[-2000:]
    assert "stopped:" in out and "0 refused" in out
    items, summaries = in_cloud(cloud_settings, edge_settings.site)
    assert len(items) == 250 - sum(1 for i in range(250) if i % 7 == 3)
    assert sorted(i["payload"]["n"] for i in items.values()) == [i for i in range(250) if i % 7 != 3]
    check_summaries(summaries, edge_settings)
    # what the operator sees of it
    shown = outpost("memory", "cloud", "--json", "--data-dir", str(cloud_settings.data_dir), env=cloud_env)
    assert shown.returncode == 0, shown.stderr
    site = orjson.loads(shown.stdout.strip().splitlines()[-1])["sites"][edge_settings.site]
    assert site["items"] == len(items) and site["entries"] == edge_log(edge_settings)[1]


def test_hostile_sync_messages_and_acks_are_dead_lettered(
    edge_settings: OutpostSettings,
    cloud: Mosquitto,
    replica: tuple[OutpostSettings, ServiceThread[CloudReplica]],
) -> None:
    cloud_settings, _ = replica
    site = "forger"  # not the edge's site: what lands on a site's up/ is taken as that site's (ACLs guard it)
    cloud_mqtt = MqttSettings(port=cloud.port)
    cloud_dlq = Collector(cloud_mqtt, cloud_settings.topics.dlq("replica"), client_id="cloud-dlq").start()
    good = {"v": 1, "id": "x", "site": site, "epoch": "e1", "stream": "ltm", "prev": 0}
    hostile: list[tuple[str, bytes, str]] = [
        (f"outpost/v1/{site}/up/memory/ltm", b"{not json", "not_json"),
        (f"outpost/v1/{site}/up/memory/ltm", b"\xff\xfe", "not_json"),
        (f"outpost/v1/{site}/up/memory/ltm", orjson.dumps({**good, "records": "x"}), "bad_sync"),
        (
            f"outpost/v1/{site}/up/memory/ltm",
            orjson.dumps({**good, "site": "elsewhere", "records": [[1, {}]]}),
            "bad_sync",
        ),
        (f"outpost/v1/{site}/up/memory/log", orjson.dumps({**good, "records": [[1, {}]]}), "bad_sync"),
        (
            "outpost/v1/a.b/up/memory/ltm",
            orjson.dumps({**good, "site": "a.b", "records": [[1, {}]]}),
            "bad_sync",
        ),
        (f"outpost/v1/{site}/up/memory/ltm", b"[" * 100_000 + b"]" * 100_000, "not_json"),
        (
            f"outpost/v1/{site}/up/memory/ltm",
            orjson.dumps({**good, "records": [[1, {"op": "add", "key": 1}]]}),
            "bad_record",
        ),
    ]
    pub = Bus(cloud_mqtt, client_id="hostile-cloud")
    pub.start()
    for topic, payload, _ in hostile:
        pub.publish(topic, payload, qos=1)
    pub.stop(drain_s=5)
    cloud_dlq.wait_for(lambda c: len(c.json()) >= len(hostile), 20)
    reasons = sorted(d["reason"] for d in cloud_dlq.json())
    assert reasons == sorted(r for _, _, r in hostile)
    cloud_dlq.stop()

    # acknowledgements the site did not ask for
    mem_service = ServiceThread(run_memory, edge_settings).start()
    wait_status(edge_settings, "memory")
    edge_dlq = Collector(edge_settings.mqtt, edge_settings.topics.dlq("memory"), client_id="edge-dlq").start()
    acks = [
        b"nope",
        b'{"stream": "secrets", "offset": 1}',
        b'{"stream": "ltm", "offset": -1}',
        b'{"stream": "ltm", "offset": 999999}',
        b'{"stream": "ltm", "offset": "1"}',
    ]
    pub = Bus(edge_settings.mqtt, client_id="hostile-edge")
    pub.start()
    for a in acks:
        pub.publish(edge_settings.topics.down("memory", "ack"), a, qos=1)
    pub.stop(drain_s=5)
    assert edge_dlq.wait_for(lambda c: len(c.json()) >= len(acks), 20)
    assert {d["reason"] for d in edge_dlq.json()} == {"bad_ack"}
    edge_dlq.stop()
    # and the site still syncs
    with MemoryClient(edge_settings, "agent") as mem:
        add_items(mem, 0, 5)
    assert converged(edge_settings, cloud_settings)
    assert len(in_cloud(cloud_settings, edge_settings.site)[0]) == 5
    svc = mem_service.stop()
    assert svc.bus.stats()["handler_errors"] == 0
    assert replica[1].stop().bus.stats()["handler_errors"] == 0


def test_outpost_up_bridges_to_the_cloud_and_memory_arrives_there(
    cloud: Mosquitto, replica: tuple[OutpostSettings, ServiceThread[CloudReplica]], tmp_path: Path, site: str
) -> None:
    """What the README says: ``uplink.cloud`` set, ``outpost up``, and the site's memory reaches the
    replica on the cloud broker."""
    cloud_settings, _ = replica
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


def test_the_cloud_follows_a_wiped_gateway_a_paused_sync_and_its_own_lost_state(
    edge_settings: OutpostSettings, cloud: Mosquitto, tmp_path: Path
) -> None:
    """The replica mirrors the site's long-term memory whatever happened in between: sync turned
    off for a while (items added then were never recorded as changes), the gateway's data wiped
    (same site id, a new memory), and the replica's own database lost."""
    cloud_settings = OutpostSettings(site="cloud", data_dir=tmp_path / "cloud-data")
    cloud_settings.mqtt.port = cloud.port

    def start_replica() -> ServiceThread[CloudReplica]:
        r = ServiceThread(run_replica, cloud_settings).start()
        wait_status(cloud_settings, "replica")
        return r

    def phase(sync: str, start: int, n: int) -> None:
        edge_settings.memory.sync = sync  # type: ignore[assignment]
        svc = ServiceThread(run_memory, edge_settings).start()
        wait_status(edge_settings, "memory")
        with MemoryClient(edge_settings, "agent") as mem:
            add_items(mem, start, n)
        if sync != "off":
            assert converged(edge_settings, cloud_settings)
        svc.stop()

    replica = start_replica()
    phase("auto", 0, 10)
    phase("off", 10, 5)  # not recorded for the cloud
    assert len(in_cloud(cloud_settings, edge_settings.site)[0]) == 10
    phase("auto", 15, 1)  # sync back on: the whole memory again
    assert sorted(
        i["payload"]["n"] for i in in_cloud(cloud_settings, edge_settings.site)[0].values()
    ) == list(range(16))
    shutil.rmtree(edge_settings.data_dir)  # a wiped (or replaced) gateway, same site id
    phase("auto", 100, 3)
    assert sorted(i["payload"]["n"] for i in in_cloud(cloud_settings, edge_settings.site)[0].values()) == [
        100,
        101,
        102,
    ]
    # the replica loses its database: the site notices and sends its memory again
    rep = replica.stop()
    assert rep.metrics.counters["resets"] >= 1
    (cloud_settings.data_dir / "replica.db").unlink()
    for leftover in cloud_settings.data_dir.glob("replica.db-*"):
        leftover.unlink()
    replica = start_replica()
    phase("auto", 200, 2)
    assert sorted(i["payload"]["n"] for i in in_cloud(cloud_settings, edge_settings.site)[0].values()) == [
        100,
        101,
        102,
        200,
        201,
    ]
    assert replica.stop().metrics.counters["unknown"] >= 1
