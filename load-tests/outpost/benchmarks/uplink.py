"""The uplink benchmark: what reaches the cloud after an outage, and how fast, with the uplink
(service and cloud side) next to a plain Mosquitto bridge, in one run.

Every setup has its own edge and cloud Mosquitto (free ports, its own temp folder, no auth) and
the same load: a producer process publishing events as ingest does (a JSON list of 10 events of
one device, each with its ``id``), QoS 1, at a fixed rate, round-robin over a few devices.

* **uplink**: the site as ``outpost up`` runs it with only the uplink service
  (:class:`outpost.stack.Stack`: the edge broker with outpost's queue limits and the
  :func:`~outpost.broker.uplink_bridge` lines, ``uplink.events=["*"]``), its events on
  ``{root}/events/{device}``; on the cloud broker ``outpost cloud run`` stores them (SQLite, or
  PostgreSQL with ``db``). **uplink_capped**: the same with ``uplink.max_bytes_s = cap``.
* **bridge**: the same bridge lines on an edge Mosquitto with Mosquitto's own defaults
  (``max_queued_messages 1000``, ``max_inflight_messages 20``, ``autosave_interval 1800``), as an
  operator who bridges the events straight to the cloud would run it; the producer publishes on
  ``{root}/up/events/{device}`` (carried by the bridge's ``up/#``), and a plain subscriber on the
  cloud broker (persistent session, QoS 1) counts the distinct ids. **bridge_kill9**: the queue
  unbounded (``max_queued_messages 0``), and the edge broker killed with SIGKILL (a power cut) at
  the end of the outage, then started again.

The cloud brokers all have outpost's queue limits, so what a setup loses is its edge's. The
producers of all setups run at the same time (their load is small: the figures compared are not
taken then): each setup's cloud broker is stopped (the link is down), the producers publish for
``outage_s``, then stop. Then, one setup at a time (nothing else running), the cloud broker is
started again ("link back") and the harness waits until the cloud holds every record the edge
broker acknowledged to the producer, or nothing new arrived for ``stall_s``.

Figures per setup: records offered (acknowledged by the edge broker), held at the cloud (distinct
ids), lost, duplicates; link back -> the edge broker reporting its bridge up (its reconnect:
``restart_timeout 1 15``, up to 15 s after a long outage) and -> the first record stored; drain
rate = records stored / (last stored - first stored); time to empty = link back -> last record
stored (the uplink: the cloud side's ``received_ns``; the bridge: the subscriber's arrival times);
for the uplink setups the bytes the cloud broker delivered on ``up/uplink/+`` to a subscriber
(topic and payload, after the first message, as ``tests/integration/test_uplink.py`` measures the
cap) against the cap; CPU of every process during the drain.

Targets (issue 11): zero loss where the plain bridge loses; catch-up of at least 10,000 records/s
uncapped; the cap held within 5%.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal

import orjson
import psycopg
from paho.mqtt.enums import MQTTErrorCode
from rich.console import Console
from rich.table import Table

from outpost.benchmarks.channels import Channels, reporting, spawn_context
from outpost.benchmarks.ingest import machine
from outpost.benchmarks.mqtt import connect, drain, paho_client, subscribe
from outpost.benchmarks.phase import (
    BenchError,
    Procs,
    cpu_between,
    drain_until,
    stack_pids,
    stop_process,
    take_result,
    wait_ready,
    workdir,
)
from outpost.benchmarks.report import machine_line
from outpost.broker import Mosquitto, uplink_bridge
from outpost.contracts import event_dict
from outpost.datadir import site_path
from outpost.services.registry import OutpostSettings
from outpost.services.uplink.store import CloudStore
from outpost.settings import BrokerSettings, UplinkSettings
from outpost.stack import Stack
from outpost.topics import Topics

SETUPS = ("uplink", "uplink_capped", "bridge", "bridge_kill9")
TARGET_CATCH_UP_PER_S = 10_000.0
TARGET_CAP_OVER_PCT = 5.0
MIN_CAP_SPAN_S = 5.0
"""The shortest capped catch-up (seconds on the wire) whose rate says anything of the cap: its burst
is a quarter second of it, so a shorter one mostly measures the burst."""
MOSQUITTO_DEFAULTS = BrokerSettings(
    auth=False,
    max_queued_messages=1000,
    max_inflight_messages=20,
    autosave_interval_s=1800,
    message_size_limit=0,
)
"""Mosquitto's own defaults for what outpost's broker config raises (mosquitto.conf(5))."""

Progress = Callable[[str], None]
Kind = Literal["uplink", "bridge"]


@dataclass(frozen=True)
class UplinkBenchOptions:
    outage_s: float = 300.0  # the link down while the producers publish
    rate: float = 1000.0  # records/s offered by each setup's producer
    per_message: int = 10  # records a message (a batch of one device's events)
    devices: int = 4
    cap: int = 1_000_000  # uplink.max_bytes_s of the capped setup
    db: str = "sqlite"  # 'sqlite': a file per setup in the temp folder; or a postgresql:// URL
    stall_s: float = 30.0  # a drain ends when nothing new arrived for this long
    drain_s: float = 900.0  # the longest a drain is waited for
    setups: tuple[str, ...] = SETUPS


# --- the producer ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProducerSpec:
    host: str
    port: int
    topics: tuple[str, ...]  # one a device
    devices: tuple[str, ...]
    rate: float
    per_message: int
    tag: str  # ids are {tag}-{device}-{seq}
    client_id: str


def run_producer(spec: ProducerSpec, ch: Channels) -> None:
    """Process entry point: connect, wait for ``go``, publish paced until ``stop_pub``, wait for the
    broker's PUBACKs, report. ``ch.sent``: records the broker has acknowledged."""
    with reporting(ch, "load", spec) as result:
        result.update(_produce(spec, ch))


def _event(spec: ProducerSpec, device: str, seq: int, ts: int) -> dict[str, Any]:
    """An event as ingest publishes it, its id unique to the run (``spec.tag``)."""
    eid = f"{spec.tag}-{device}-{seq}"
    return event_dict(
        device, seq, "temperature", round(3.0 + (seq % 40) / 10, 1), "C", ts=ts, id=eid, trace=eid
    )


def _produce(spec: ProducerSpec, ch: Channels) -> dict[str, Any]:
    client = paho_client(spec.client_id)
    client.max_inflight_messages_set(1000)
    acked = [0]

    def on_publish(_c: Any, _u: Any, _mid: int, _rc: Any, _p: Any) -> None:
        acked[0] += 1
        ch.sent.value = acked[0] * spec.per_message

    client.on_publish = on_publish
    connect(client, spec.host, spec.port)
    ch.pub_ready.set()
    while not ch.go.value:
        client.loop(0.01)
    interval = spec.per_message / spec.rate
    seqs = [0] * len(spec.devices)
    sent = nbytes = 0
    t0 = time.perf_counter()
    while not ch.stop_pub.value:
        wait = t0 + sent * interval - time.perf_counter()
        if wait > 0:
            client.loop(min(wait, 0.01))
            continue
        d = sent % len(spec.devices)
        seq, ts = seqs[d], time.time_ns()
        seqs[d] += spec.per_message
        batch = [_event(spec, spec.devices[d], s, ts) for s in range(seq, seq + spec.per_message)]
        payload = orjson.dumps(batch)
        client.publish(spec.topics[d], payload, qos=1)
        sent += 1
        nbytes += len(payload)
        if sent % 8 == 0:
            client.loop(0)
    elapsed = time.perf_counter() - t0
    flushed = drain(client, lambda: acked[0] >= sent, 30.0)
    client.disconnect()
    return {
        "msgs": sent,
        "acked_msgs": acked[0],
        "records": acked[0] * spec.per_message,
        "offered_per_s": round(sent * spec.per_message / elapsed, 1) if elapsed > 0 else 0.0,
        "payload_bytes_mean": round(nbytes / sent, 1) if sent else 0.0,
        "flushed": flushed,
    }


# --- the cloud's subscribers -----------------------------------------------------------------------


@dataclass(frozen=True)
class CloudSinkSpec:
    host: str
    port: int
    topic: str
    mode: Literal["records", "wire"]  # records: distinct ids of event batches; wire: bytes and times
    client_id: str


def run_cloud_sink(spec: CloudSinkSpec, ch: Channels) -> None:
    """Process entry point: a plain paho subscriber on the cloud broker (QoS 1, a persistent
    session), reconnecting while the broker is down, until ``stop_sink``. ``ch.received``: distinct
    records (``records``) or messages (``wire``)."""
    with reporting(ch, "sink", spec) as result:
        result.update(_sink(spec, ch))


def _sink(spec: CloudSinkSpec, ch: Channels) -> dict[str, Any]:
    client = paho_client(spec.client_id, persistent=True)
    seen: set[str] = set()
    counts = {"messages": 0, "records": 0, "duplicates": 0, "bytes": 0, "after_first_bytes": 0}
    first, last = [0], [0]

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        now = time.time_ns()
        if not first[0]:
            first[0] = now
        else:
            counts["after_first_bytes"] += len(msg.topic) + len(msg.payload)
        last[0] = now
        counts["messages"] += 1
        counts["bytes"] += len(msg.topic) + len(msg.payload)
        if spec.mode == "wire":
            ch.received.value = counts["messages"]
            return
        for item in orjson.loads(msg.payload):
            counts["records"] += 1
            rid = item["id"]
            if rid in seen:
                counts["duplicates"] += 1
            else:
                seen.add(rid)
        ch.received.value = len(seen)

    client.on_message = on_message
    connect(client, spec.host, spec.port)
    subscribe(client, [(spec.topic, 1)])
    ch.sink_ready.set()
    while not ch.stop_sink.value:
        if client.loop(0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:  # the broker is down: try again
            time.sleep(0.2)
            with contextlib.suppress(OSError):
                client.reconnect()
    client.disconnect()
    span = (last[0] - first[0]) / 1e9
    return {
        **counts,
        "distinct": len(seen),
        "first_ns": first[0],
        "last_ns": last[0],
        "bytes_per_s_after_first": round(counts["after_first_bytes"] / span, 1) if span > 0 else None,
    }


def wait_retained(host: str, port: int, topic: str, ok: Callable[[bytes], bool], timeout_s: float) -> None:
    """Until a message on ``topic`` (a retained one counts) satisfies ``ok``: a service's status,
    a bridge's state."""
    client = paho_client(f"bench-watch-{uuid.uuid4().hex[:12]}")
    got = [False]

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        got[0] = got[0] or ok(bytes(msg.payload))

    client.on_message = on_message
    connect(client, host, port)
    try:
        subscribe(client, [(topic, 1)])
        if not drain(client, lambda: got[0], timeout_s):
            raise BenchError(f"nothing on {topic} at {host}:{port} said so within {timeout_s:g} s")
    finally:
        client.disconnect()


def _online(payload: bytes) -> bool:
    try:
        return bool(orjson.loads(payload).get("state") == "online")
    except (orjson.JSONDecodeError, AttributeError):
        return False


# --- one setup -------------------------------------------------------------------------------------


@dataclass
class Setup:
    """One setup's parts while the benchmark runs."""

    name: str
    kind: Kind
    work: Path
    topics: Topics
    ch: Channels
    cloud: Mosquitto
    edge: Mosquitto  # the uplink setups: the stack's broker
    stack: Stack | None = None
    cloud_side: subprocess.Popen[bytes] | None = None
    db: str = ""
    procs: list[BaseProcess] = field(default_factory=list)
    back_ns: int = 0

    def dead(self) -> str | None:
        for p in self.procs:
            if p.exitcode is not None and not (p.name.endswith("load") and p.exitcode == 0):
                return f"{self.name}: {p.name} exited with {p.exitcode}"
        if self.cloud_side is not None and self.cloud_side.poll() is not None:
            log = (self.work / "cloud-side.log").read_text(errors="replace")[-2000:]
            return f"{self.name}: the cloud side exited with {self.cloud_side.returncode}: {log}"
        return None

    def stored(self, *, full: bool = False) -> dict[str, int]:
        """The uplink setups: records the cloud side holds of this site; ``full``: also distinct
        ids and the first and last ``received_ns`` (a sort: once, at the end)."""
        site = self.topics.site  # a checked segment: [A-Za-z0-9_-]
        what = "count(*)"
        if full:
            what += ", count(DISTINCT id), coalesce(min(received_ns), 0), coalesce(max(received_ns), 0)"
        store = CloudStore(self.db, readonly=True)
        try:
            row = store.db.execute(f"SELECT {what} FROM records WHERE site = '{site}'").fetchone()
        finally:
            store.close()
        out = {"count": int(row[0])}
        if full:
            out.update(distinct=int(row[1]), first_ns=int(row[2]), last_ns=int(row[3]))
        return out

    def outbox_left(self) -> int | None:
        path = site_path(self.work / "edge", self.topics.site, "uplink", "outbox.db")
        if not path.exists():
            return None
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return int(db.execute("SELECT count(*) FROM records").fetchone()[0])
        finally:
            db.close()

    def stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        stop_process(self.cloud_side, 15)
        if self.stack is not None:
            self.stack.stop()  # its broker too
        else:
            self.edge.stop()
        self.cloud.stop()


def _uplink_setup(name: str, o: UplinkBenchOptions, work: Path, tag: str) -> Setup:
    """The site as ``outpost up`` runs it with the uplink service alone, and ``outpost cloud run``."""
    site = f"b-{name.replace('_', '-')}-{tag}"
    cloud = Mosquitto(work / "cloud-broker", settings=BrokerSettings(auth=False)).start()
    settings = OutpostSettings(
        site=site, data_dir=work / "edge", log_level="WARNING", broker=BrokerSettings(auth=False)
    )
    settings.uplink.cloud = cloud.address
    env = {
        "OUTPOST_UPLINK__CLOUD": cloud.address,
        "OUTPOST_UPLINK__EVENTS": '["*"]',
        "OUTPOST_UPLINK__MAX_BYTES_S": str(o.cap if name == "uplink_capped" else 0),
    }
    stack = Stack(settings, env=env, services={"uplink": OutpostSettings.SERVICES["uplink"]})
    db = f"sqlite:///{work / 'cloud.db'}" if o.db == "sqlite" else o.db
    ch = Channels.create(spawn_context())
    s = Setup(
        name, "uplink", work, settings.topics, ch, cloud, edge=cloud, db=db
    )  # edge: once the stack is up
    try:
        stack.start()
        assert stack.broker is not None
        s.stack, s.edge = stack, stack.broker
        env_cloud = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
        # in a real outage the link fails, not the cloud broker, and the cloud side stays connected:
        # here it must come back with its broker, not after a backoff of up to 15 s of its own
        env_cloud.update(
            OUTPOST_SITE="cloud",
            OUTPOST_DATA_DIR=str(work / "cloud-data"),
            OUTPOST_LOG_LEVEL="WARNING",
            OUTPOST_MQTT__RECONNECT_MAX_S="0.5",
        )
        cmd = [
            sys.executable,
            "-m",
            "outpost.cli.main",
            "cloud",
            "run",
            "--db",
            db,
            "--broker",
            cloud.address,
        ]
        with open(work / "cloud-side.log", "wb") as log:
            s.cloud_side = subprocess.Popen(
                cmd, env=env_cloud, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
    except BaseException:
        s.stop()
        raise
    return s


def _bridge_setup(name: str, work: Path, tag: str) -> Setup:
    """An edge Mosquitto with Mosquitto's defaults (``bridge_kill9``: an unbounded queue) and the
    uplink's bridge lines; the events go out on ``up/events/{device}``."""
    site = f"b-{name.replace('_', '-')}-{tag}"
    topics = Topics(site=site)
    cloud = Mosquitto(work / "cloud-broker", settings=BrokerSettings(auth=False)).start()
    edge_settings = MOSQUITTO_DEFAULTS
    if name == "bridge_kill9":
        edge_settings = MOSQUITTO_DEFAULTS.model_copy(update={"max_queued_messages": 0})
    bridge = uplink_bridge(topics, UplinkSettings(cloud=cloud.address))
    try:
        edge = Mosquitto(work / "edge-broker", settings=edge_settings, extra_conf=bridge).start()
    except BaseException:
        cloud.stop()
        raise
    return Setup(name, "bridge", work, topics, Channels.create(spawn_context()), cloud, edge)


def _start_processes(s: Setup, o: UplinkBenchOptions, tag: str) -> None:
    """The producer and the cloud's subscriber; ids ``{tag}{setup's index}-{device}-{seq}``: the
    same size in every setup, so are the messages."""
    ctx = spawn_context()
    devices = tuple(f"bench-dev-{i}" for i in range(o.devices))
    if s.kind == "uplink":
        topics = tuple(s.topics.events(d) for d in devices)
        sink = CloudSinkSpec(
            s.cloud.host, s.cloud.port, f"{s.topics.root}/up/uplink/+", "wire", f"tap-{s.name}"
        )
    else:
        topics = tuple(f"{s.topics.root}/up/events/{d}" for d in devices)
        sink = CloudSinkSpec(
            s.cloud.host, s.cloud.port, f"{s.topics.root}/up/events/+", "records", f"sub-{s.name}"
        )
    load = ProducerSpec(
        s.edge.host,
        s.edge.port,
        topics,
        devices,
        o.rate,
        o.per_message,
        f"{tag}{SETUPS.index(s.name)}",
        f"load-{s.name}",
    )
    for role, fn, spec in (("sink", run_cloud_sink, sink), ("load", run_producer, load)):
        p = ctx.Process(target=fn, args=(spec, s.ch), name=f"{s.name}-{role}", daemon=True)
        p.start()
        s.procs.append(p)


def _wait_ready(s: Setup) -> None:
    e, c = s.edge, s.cloud
    wait_ready(f"{s.name}: the cloud subscriber", s.ch.sink_ready.is_set, 60, s.dead)
    wait_ready(f"{s.name}: the producer", s.ch.pub_ready.is_set, 60, s.dead)
    if s.kind == "uplink":
        wait_retained(e.host, e.port, s.topics.service_status("uplink"), _online, 60)
        wait_retained(c.host, c.port, Topics(site="cloud").service_status("cloud"), _online, 60)
    wait_retained(e.host, e.port, s.topics.uplink_state(), lambda p: p == b"1", 60)


def _pids(s: Setup) -> dict[str, int | None]:
    out: dict[str, int | None] = {
        "edge_broker": s.edge.proc.pid if s.edge.proc else None,
        "cloud_broker": s.cloud.proc.pid if s.cloud.proc else None,
    }
    if s.stack is not None:
        out["uplink"] = stack_pids(s.stack).get("uplink")
    if s.cloud_side is not None:
        out["cloud_side"] = s.cloud_side.pid
    sink = next((p for p in s.procs if p.name.endswith("sink")), None)
    out["wire_tap" if s.kind == "uplink" else "subscriber"] = sink.pid if sink else None
    return out


class _BridgeWatch:
    """When the edge broker reports its bridge up again (its own thread: the time is taken as the
    state arrives)."""

    def __init__(self, s: Setup) -> None:
        self.up_ns = 0
        self.client = paho_client(f"bench-bridge-watch-{uuid.uuid4().hex[:12]}")

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            if msg.payload == b"1" and not self.up_ns:
                self.up_ns = time.time_ns()

        self.client.on_message = on_message
        connect(self.client, s.edge.host, s.edge.port)
        subscribe(self.client, [(s.topics.uplink_state(), 1)])  # the retained "0" first
        self.client.loop_start()

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _drain(s: Setup, o: UplinkBenchOptions, offered: int) -> dict[str, Any]:
    """Link back (the cloud broker started again), then wait for the cloud to hold everything."""
    watch = _BridgeWatch(s)
    s.back_ns = time.time_ns()
    s.cloud.start()
    cpu = Procs()
    for role, pid in _pids(s).items():
        cpu.add(role, pid)
    a = cpu.sample(s.ch)

    def held() -> int:
        return s.stored()["count"] if s.kind == "uplink" else int(s.ch.received.value)

    def check() -> None:
        dead = s.dead()
        if dead:
            raise BenchError(dead)

    try:
        waited = drain_until(held, lambda n: n >= offered, o.drain_s, o.stall_s, tick_s=0.5, on_tick=check)
    finally:
        watch.stop()
    b = cpu.sample(s.ch)
    out: dict[str, Any] = {
        "drain_wait": waited,
        "bridge_up_after_back_s": round((watch.up_ns - s.back_ns) / 1e9, 2) if watch.up_ns else None,
        "cpu_pct": cpu_between(a, b),
    }
    if s.kind == "uplink":
        left = s.outbox_left()
        deadline = time.monotonic() + 15
        while left and time.monotonic() < deadline:  # the last acknowledgements on their way
            time.sleep(0.2)
            left = s.outbox_left()
        out["outbox_left"] = left
    time.sleep(1.0)  # the subscriber's last messages
    s.ch.stop_sink.value = 1
    out["sink"] = {k: v for k, v in take_result(s.ch, "sink").items() if k != "spec"}
    return out


def _figures(
    s: Setup, o: UplinkBenchOptions, load: dict[str, Any], drained: dict[str, Any]
) -> dict[str, Any]:
    offered = int(load["records"])
    sink = drained.pop("sink")
    if s.kind == "uplink":
        st = s.stored(full=True)
        held, dups, first, last = st["distinct"], st["count"] - st["distinct"], st["first_ns"], st["last_ns"]
    else:
        held, dups, first, last = sink["distinct"], sink["duplicates"], sink["first_ns"], sink["last_ns"]
    span = (last - first) / 1e9
    out: dict[str, Any] = {
        "kind": s.kind,
        "offered": offered,
        "offered_per_s": load["offered_per_s"],
        "payload_bytes_mean": load["payload_bytes_mean"],
        "producer_flushed": load["flushed"],
        "held": held,
        "lost": offered - held,
        "lost_pct": round(100.0 * (offered - held) / offered, 2) if offered else 0.0,
        "duplicates": dups,
        "first_after_back_s": round((first - s.back_ns) / 1e9, 2) if first else None,
        "drain_per_s": round(held / span) if span > 0 else None,
        "per_s_from_back": round(held / ((last - s.back_ns) / 1e9)) if last else None,
        "empty_s": round((last - s.back_ns) / 1e9, 2) if last and held >= offered else None,
        "last_after_back_s": round((last - s.back_ns) / 1e9, 2) if last else None,
        **drained,
    }
    if s.kind == "uplink":
        wire = sink["bytes_per_s_after_first"]
        out["wire"] = {
            "messages": sink["messages"],
            "bytes": sink["bytes"],
            "bytes_per_s_after_first": wire,
            "span_s": round((sink["last_ns"] - sink["first_ns"]) / 1e9, 3) if sink["messages"] else 0.0,
        }
        if s.name == "uplink_capped":
            out["cap"] = o.cap
            out["cap_over_pct"] = round(100.0 * (wire / o.cap - 1.0), 2) if wire else None
    else:
        out["subscriber"] = {k: sink[k] for k in ("messages", "records", "duplicates", "bytes")}
    return out


def _targets(setups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ups = {n: r for n, r in setups.items() if r["kind"] == "uplink"}
    bridges = {n: r["lost"] for n, r in setups.items() if r["kind"] == "bridge"}
    out: dict[str, Any] = {
        "zero_loss": {
            "uplink_lost": {n: r["lost"] for n, r in ups.items()},
            "uplink_duplicates": {n: r["duplicates"] for n, r in ups.items()},
            "bridge_lost": bridges,
            "bridge_loses": any(v > 0 for v in bridges.values()),
            "met": bool(ups) and all(r["lost"] == 0 and r["duplicates"] == 0 for r in ups.values()),
        }
    }
    if "uplink" in setups:
        rate = setups["uplink"]["drain_per_s"] or 0
        out["catch_up"] = {
            "min_per_s": TARGET_CATCH_UP_PER_S,
            "per_s": rate,
            "met": rate >= TARGET_CATCH_UP_PER_S,
        }
    if "uplink_capped" in setups:
        capped = setups["uplink_capped"]
        over, span = capped.get("cap_over_pct"), capped["wire"]["span_s"]
        # a catch-up of a few bursts (a quarter second of the cap each) says nothing of the cap
        judged = span >= MIN_CAP_SPAN_S
        out["cap"] = {
            "max_over_pct": TARGET_CAP_OVER_PCT,
            "over_pct": over,
            "span_s": span,
            "met": (over is not None and over <= TARGET_CAP_OVER_PCT) if judged else None,
        }
    out["all_met"] = all(t["met"] is not False for t in out.values() if isinstance(t, dict))
    return out


def run_uplink_bench(options: UplinkBenchOptions, *, progress: Progress | None = None) -> dict[str, Any]:
    """Every setup in a temp folder of its own: the outage with all producers at once, then each
    setup's drain alone; returns the figures."""
    say = progress or (lambda _m: None)
    o = options
    unknown = set(o.setups) - set(SETUPS)
    if unknown:
        raise BenchError(f"unknown setup {sorted(unknown)}; known: {', '.join(SETUPS)}")
    if o.db != "sqlite" and not o.db.startswith(("postgresql://", "postgres://")):
        raise BenchError(f"--db must be sqlite or a postgresql:// URL, got {o.db[:80]!r}")
    started = time.monotonic()
    result: dict[str, Any] = {"bench": "uplink", "machine": machine(), "options": asdict(o)}
    tag = uuid.uuid4().hex[:6]
    setups: list[Setup] = []
    with workdir("outpost-bench-uplink-") as work:
        try:
            for name in o.setups:
                say(
                    f"{name}: starting its edge and cloud brokers"
                    + (" and the uplink" if "uplink" in name else "")
                )
                folder = work / name
                folder.mkdir()
                s = (
                    _uplink_setup(name, o, folder, tag)
                    if name.startswith("uplink")
                    else _bridge_setup(name, folder, tag)
                )
                setups.append(s)
                _start_processes(s, o, tag)
            for s in setups:
                _wait_ready(s)
            say("the links go down (every cloud broker stopped)")
            for s in setups:
                s.cloud.stop()
            for s in setups:
                wait_retained(s.edge.host, s.edge.port, s.topics.uplink_state(), lambda p: p == b"0", 30)
            say(f"outage: {len(setups)} producers at {o.rate:,.0f} records/s each for {o.outage_s:g} s")
            for s in setups:
                s.ch.go.value = 1
            end = time.monotonic() + o.outage_s
            while time.monotonic() < end:
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))
                for s in setups:
                    dead = s.dead()
                    if dead:
                        raise BenchError(dead)
            loads: dict[str, dict[str, Any]] = {}
            for s in setups:
                s.ch.stop_pub.value = 1
            for s in setups:
                loads[s.name] = take_result(s.ch, "load")
            for s in setups:
                if s.name == "bridge_kill9":
                    say("bridge_kill9: the edge broker killed (SIGKILL) and started again")
                    s.edge.kill()
                    s.edge.start()
            figures: dict[str, dict[str, Any]] = {}
            for s in setups:
                offered = int(loads[s.name]["records"])
                say(f"{s.name}: link back, draining {offered:,} records")
                drained = _drain(s, o, offered)
                figures[s.name] = _figures(s, o, loads[s.name], drained)
                f = figures[s.name]
                say(
                    f"{s.name}: held {f['held']:,} of {f['offered']:,} (lost {f['lost']:,})"
                    + (
                        f", drain {f['drain_per_s'] or 0:,} records/s, the last {f['last_after_back_s']} s "
                        "after link back"
                        if f["held"]
                        else ""
                    )
                )
        finally:
            for s in setups:
                s.stop()
            if o.db != "sqlite":
                _forget(o.db, [s.topics.site for s in setups if s.kind == "uplink"])
    result["setups"] = figures
    result["targets"] = _targets(figures)
    result["machine"]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    return result


def _forget(url: str, sites: list[str]) -> None:
    """The run's rows out of the given PostgreSQL database (each setup had a site of its own)."""
    with contextlib.suppress(psycopg.Error), psycopg.connect(url, autocommit=True, connect_timeout=10) as db:
        for table in ("records", "streams", "lag"):
            db.execute(f"DELETE FROM {table} WHERE site = ANY(%s)", (sites,))


# --- the report ------------------------------------------------------------------------------------


def _n(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:,}" if isinstance(x, int) else f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.2f}"


def uplink_table(result: dict[str, Any]) -> Table:
    o, st = result["options"], result["setups"]
    t = Table(
        title=f"uplink after a {o['outage_s']:g} s outage at {o['rate']:,.0f} records/s "
        f"({o['per_message']} a message, QoS 1), next to a plain Mosquitto bridge"
    )
    t.add_column("")
    for name in st:
        t.add_column(name, justify="right")

    def row(label: str, f: Callable[[dict[str, Any]], Any]) -> None:
        t.add_row(label, *(_n(f(r)) if not isinstance(f(r), str) else f(r) for r in st.values()))

    row("offered (acknowledged by the edge broker)", lambda r: r["offered"])
    row("held at the cloud (distinct ids)", lambda r: r["held"])
    row("lost", lambda r: f"{r['lost']:,} ({r['lost_pct']}%)")
    row("duplicates", lambda r: r["duplicates"])
    row("link back -> bridge up, s", lambda r: r["bridge_up_after_back_s"])
    row("link back -> first record, s", lambda r: r["first_after_back_s"])
    row("drain, records/s (first -> last stored)", lambda r: r["drain_per_s"])
    row("records/s from link back", lambda r: r["per_s_from_back"])
    row("time to empty (link back -> all stored), s", lambda r: r["empty_s"])
    row("link back -> last record, s", lambda r: r["last_after_back_s"])
    row("on the wire, bytes/s", lambda r: r.get("wire", {}).get("bytes_per_s_after_first"))
    row("vs the cap", lambda r: f"{r['cap_over_pct']:+.2f}% of {r['cap']:,}" if "cap" in r else "")
    row("outbox left", lambda r: r.get("outbox_left"))
    roles = [*sorted({k for r in st.values() for k in r["cpu_pct"]} - {"other", "steal"}), "other", "steal"]
    for role in roles:

        def cpu(r: dict[str, Any], role: str = role) -> Any:
            return r["cpu_pct"].get(role)

        row(f"CPU % {role} (drain)", cpu)
    return t


def print_uplink(result: dict[str, Any], console: Console) -> None:
    console.print(uplink_table(result))
    tg = result["targets"]

    def met(ok: bool | None) -> str:
        if ok is None:
            return f"[yellow]not judged[/] (the catch-up lasted under {MIN_CAP_SPAN_S:g} s on the wire)"
        return "[green]met[/]" if ok else "[red]MISSED[/]"

    z = tg["zero_loss"]
    bridges = ", ".join(f"{n} {v:,}" for n, v in z["bridge_lost"].items()) or "not in this run"
    parts = [
        f"zero loss: {met(z['met'])} (uplink lost {sum(z['uplink_lost'].values()):,}; "
        f"the plain bridge lost: {bridges})"
    ]
    if "catch_up" in tg:
        c = tg["catch_up"]
        parts.append(f"catch-up >= {c['min_per_s']:,.0f}/s: {met(c['met'])} ({_n(c['per_s'])}/s)")
    if "cap" in tg:
        c = tg["cap"]
        parts.append(f"cap within {c['max_over_pct']:g}%: {met(c['met'])} ({_n(c['over_pct'])}%)")
    console.print("; ".join(parts))
    console.print(machine_line(result))
