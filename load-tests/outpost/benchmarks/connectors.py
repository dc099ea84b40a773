"""The connector benchmark (issue 9): actions/s and the latency the gateway adds, against direct
httpx calls to the same local endpoint, in one run on one site.

The peer is the simulated store API (:mod:`outpost.sim.store_api`: ``POST /reorders``, once per
``Idempotency-Key``) in a process of its own, so that it shares no GIL with the load. The site is the
real one (:class:`outpost.stack.Stack`: its own Mosquitto) running only the connector gateway, with
one ``http`` connector declared through ``OUTPOST_CONNECTORS__DECLARED``: the capability
``bench.reorder`` is ``POST /reorders``, ``concurrency`` calls in flight (the same as the direct
phase's threads), a bucket far above the load, the durable outbox on (``log_sync`` FULL, the
gateway's default, unless told otherwise).

Phases, every request with a key of its own:

* ``direct``: ``concurrency`` threads of one process, one ``httpx.Client``, ``POST /reorders``
  at ``rate`` calls/s (slot *k* is due at ``start + k / rate``; latency is due time -> answer, so a
  call that waits for a free thread counts its wait, as a request waiting in the gateway does);
* ``gateway``: ActionRequests at ``rate``/s, QoS 1, to ``actions/bench``; latency is publish ->
  the request's ActionResult at a subscriber of ``actions/bench/results`` (two hops through the
  broker, the outbox commit, the call);
* ``hops``: the broker alone at ``rate`` messages/s, QoS 1, to a topic no service reads, straight
  back to a subscriber: one MQTT hop, publish -> subscriber;
* ``direct_max``: the direct threads flat out (closed loop): what the peer and httpx manage;
* ``gateway_max``: ActionRequests with at most ``window`` of them unanswered: the most actions/s.

The gateway's added latency is gateway - direct at each percentile. The two paced phases are
compared, so they take turns: ``rounds`` slices of each, ``duration_s / rounds`` long, direct then
gateway, each slice starting once the other's calls have all been answered. Whatever else the
machine does during the run (the two cores are shared) then weighs on both alike, where two
windows one after the other could catch it in one and not the other. Every request is accounted for:
results by outcome, missing, duplicated, and the peer's own count of effects per key (each key of
the gateway phases must have had its effect exactly once). CPU per process (the gateway, Mosquitto,
the store API, the benchmark's own processes) over each window; with ``profile_dir``, py-spy samples
the gateway during the ``gateway`` window.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, cast

import httpx
import orjson

from outpost.benchmarks.agent import _Profiler
from outpost.benchmarks.channels import Channels, reporting, spawn_context
from outpost.benchmarks.ingest import machine
from outpost.benchmarks.load import LoadSpec, Stamps, run_publisher
from outpost.benchmarks.mqtt import connect, drain, paho_client, subscribe
from outpost.benchmarks.phase import (
    BenchError,
    Procs,
    Sample,
    cpu_between,
    drain_until,
    stack_pids,
    take_result,
    wait_ready,
    workdir,
)
from outpost.benchmarks.sinks import SinkSpec, latency_summary, run_raw_sink
from outpost.broker import free_port
from outpost.metrics import Histogram
from outpost.services.registry import OutpostSettings
from outpost.settings import BrokerSettings
from outpost.stack import Stack
from outpost.topics import Topics

TARGET_ADDED_P99_MS = 2.0
TARGET_ACTIONS_PER_S = 1000.0
CONNECTOR = "bench"
CAPABILITY = "bench.reorder"
PATH = "/reorders"
SERVICE = "connectors"
PAUSED_POLL_S = 0.01
"""How often a paused load looks whether its turn has come: rarely enough that it takes no CPU
worth counting from the other phase's turn (8 direct threads every 1 ms took 7% of a core)."""

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ConnectorsBenchOptions:
    rate: float = 1000.0  # actions/s offered in the paced phases (direct, hops, gateway)
    concurrency: int = 8  # the connector's calls in flight, and the direct phase's threads
    duration_s: float = 10.0  # the measurement window of each phase
    rounds: int = 5  # the paced direct and gateway phases take turns: this many slices of each
    warmup_s: float = 2.0  # load before the window opens
    window: int = 2000  # gateway_max: most requests unanswered at once
    log_sync: str = "FULL"  # the outbox's SQLite synchronous (connectors.log_sync)
    settle_s: float = 2.0  # after the gateway is online, before any load
    drain_s: float = 120.0  # after the window, the longest wait for what is on its way (a backlog)
    stall_s: float = 3.0  # ... or until nothing more arrived for this long
    profile_dir: Path | None = None  # py-spy the gateway during the gateway window
    profile_rate: int = 100
    profile_idle: bool = False

    @classmethod
    def make(cls, *, quick: bool = False, **kw: Any) -> ConnectorsBenchOptions:
        if quick:
            kw.setdefault("duration_s", 3.0)
            kw.setdefault("warmup_s", 1.0)
            kw.setdefault("drain_s", 30.0)
            kw.setdefault("settle_s", 1.0)
            kw.setdefault("rounds", 3)
        return cls(**kw)

    @property
    def capacity(self) -> int:
        """Requests whose send time is kept: more than a phase can send before it is stopped."""
        return int(max(self.rate, 20_000.0) * (self.warmup_s + self.duration_s) * 1.5) + 1000


def connector_declaration(url: str, concurrency: int) -> dict[str, Any]:
    """One http connector on the store API, nothing that would hold a request back."""
    return {
        CONNECTOR: {
            "kind": "http",
            "endpoint": {"base_url": url},
            "capabilities": {
                CAPABILITY: {
                    "op": {"method": "POST", "path": PATH},
                    "input": {"type": "object", "required": ["sku", "qty"]},
                }
            },
            "timeout_s": 10.0,
            "rate": {"per_s": 1e6, "burst": 1e6},
            "concurrency": concurrency,
        }
    }


# --- the direct phase --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DirectSpec:
    url: str
    rate: float  # calls/s; 0: flat out
    concurrency: int
    prefix: str  # of every Idempotency-Key


def run_direct(spec: DirectSpec, ch: Channels) -> None:
    """Process entry point: ``concurrency`` threads calling the store API with one httpx.Client."""
    with reporting(ch, "load", spec) as result:
        result.update(_direct(spec, ch))


def _direct(spec: DirectSpec, ch: Channels) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency)
    client = httpx.Client(base_url=spec.url, timeout=10.0, limits=limits)
    client.post(PATH, json={"sku": "warm", "qty": 1}, headers={"Idempotency-Key": f"{spec.prefix}-warm"})
    ch.pub_ready.set()
    lock = threading.Lock()
    hist = Histogram()
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    slot = [0]
    pace = Pace(0, paused=True)  # it starts at the first go
    step = 1e9 / spec.rate if spec.rate > 0 else 0.0
    go, sent, received, stop = ch.go, ch.sent, ch.received, ch.stop_pub
    lat_from, lat_to = ch.lat_from, ch.lat_to

    def worker() -> None:
        while not stop.value:
            with lock:
                if not go.value:  # paused: before its phase, or the other phase's turn
                    pace.paused = True
                    k = -1
                else:
                    k = slot[0]
                    slot[0] += 1
                    sent.value = k + 1
                    if pace.paused:  # resumed: the schedule starts again from now
                        pace.restart(time.time_ns(), k)
            if k < 0:
                time.sleep(PAUSED_POLL_S)
                continue
            if step:
                due = int(pace.t0) + int((k - pace.k0) * step)
                wait = due - time.time_ns()
                if wait > 0:
                    time.sleep(wait / 1e9)
            else:
                due = time.time_ns()
            try:
                r = client.post(
                    PATH,
                    json={"sku": f"sku-{k % 1000}", "qty": 1},
                    headers={"Idempotency-Key": f"{spec.prefix}-{k}"},
                )
                status: int | None = r.status_code
            except httpx.HTTPError as exc:
                status = None
                name = type(exc).__name__
            now = time.time_ns()
            with lock:
                received.value += 1
                if status is None:
                    errors[name] += 1
                else:
                    statuses[status] += 1
                lo, hi = lat_from.value, lat_to.value
                if lo and due >= lo and (not hi or due < hi):
                    hist.record_ns(now - due)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(spec.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    client.close()
    return {
        "sent": slot[0],
        "answered": received.value,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": dict(errors),
        "latency": latency_summary(hist),
    }


@dataclass
class Pace:
    """A paced load's schedule: slot *k* is due at ``t0 + (k - k0) / rate``; a pause (the other
    phase's turn) restarts it from the slot and the time it resumes at, so no backlog of slots that
    fell due while it was paused is sent at once."""

    t0: float
    k0: int = 0
    paused: bool = False

    def restart(self, t0: float, k0: int) -> None:
        self.t0, self.k0, self.paused = t0, k0, False


# --- the gateway phases: requests in, results out ------------------------------------------------


@dataclass(frozen=True)
class RequestSpec:
    host: str
    port: int
    site: str
    prefix: str  # of every key: '{prefix}-{k}'
    rate: float  # requests/s; 0: windowed (at most ``window`` unanswered)
    window: int
    client_id: str


def request_payload(key: str, k: int, ts: int) -> bytes:
    return orjson.dumps(
        {
            "v": 1,
            "id": key,
            "ts": ts,
            "trace": "",
            "key": key,
            "agent": "bench",
            "capability": CAPABILITY,
            "args": {"sku": f"sku-{k % 1000}", "qty": 1},
        }
    )


def run_requests(spec: RequestSpec, ch: Channels, stamps: Stamps) -> None:
    """Process entry point: ActionRequests at QoS 1, paced or windowed; request *k*'s publish time
    goes to ``stamps[k]``."""
    with reporting(ch, "load", spec) as result:
        result.update(_requests(spec, ch, stamps))


def _requests(spec: RequestSpec, ch: Channels, stamps: Stamps) -> dict[str, Any]:
    client = paho_client(spec.client_id)
    client.max_inflight_messages_set(65000)
    acked = [0]

    def on_publish(_c: Any, _u: Any, _mid: int, _rc: Any, _p: Any) -> None:
        acked[0] += 1

    client.on_publish = on_publish
    connect(client, spec.host, spec.port)
    ch.pub_ready.set()
    topic = Topics(site=spec.site).actions(CONNECTOR)
    publish, loop, stop, sent_cell, received = client.publish, client.loop, ch.stop_pub, ch.sent, ch.received
    go = ch.go
    cap = len(stamps)
    interval = 1.0 / spec.rate if spec.rate > 0 else 0.0
    k = errors = 0
    start = time.perf_counter()
    pace = Pace(start, paused=True)  # it starts at the first go
    while not stop.value and k < cap:
        if not go.value:  # paused: before its phase, or the other phase's turn
            pace.paused = True
            loop(PAUSED_POLL_S)
            continue
        if pace.paused:
            pace.restart(time.perf_counter(), k)
        if interval:
            wait = pace.t0 + (k - pace.k0) * interval - time.perf_counter()
            if wait > 0:
                loop(min(wait, 0.002))
                continue
        elif k - received.value >= spec.window:
            loop(0.0005)
            continue
        ts = time.time_ns()
        stamps[k] = ts
        if publish(topic, request_payload(f"{spec.prefix}-{k}", k, ts), 1).rc:
            errors += 1
        k += 1
        sent_cell.value = k
        if not k & 15:
            loop(0.0)
    elapsed = time.perf_counter() - start
    flushed = drain(client, lambda: acked[0] >= k - errors, 15.0)
    client.disconnect()
    return {"sent": k, "acked": acked[0], "errors": errors, "flushed": flushed, "elapsed_s": elapsed}


@dataclass(frozen=True)
class ResultSinkSpec:
    host: str
    port: int
    site: str
    prefix: str
    client_id: str
    capacity: int


def run_result_sink(spec: ResultSinkSpec, ch: Channels, stamps: Stamps, arrivals: Stamps) -> None:
    """Process entry point: the phase's ActionResults (latency from the request's publish time; the
    arrival of result *k* in ``arrivals[k]``), and the gateway's status (``service_ready`` once it is
    online)."""
    with reporting(ch, "sink", spec) as result:
        result.update(_results(spec, ch, stamps, arrivals))


def _results(spec: ResultSinkSpec, ch: Channels, stamps: Stamps, arrivals: Stamps) -> dict[str, Any]:
    topics = Topics(site=spec.site)
    client = paho_client(spec.client_id)
    mine = spec.prefix + "-"
    cut = len(mine)
    seen = bytearray(spec.capacity)
    hist = Histogram()
    outcomes: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    attempts: Counter[int] = Counter()
    received, lat_from, lat_to = ch.received, ch.lat_from, ch.lat_to
    metrics: dict[str, Any] = {}

    def on_result(_c: Any, _u: Any, msg: Any) -> None:
        now = time.time_ns()
        body = orjson.loads(msg.payload)
        for doc in body if isinstance(body, list) else [body]:
            key = str(doc.get("key", ""))
            if not key.startswith(mine):
                continue  # another phase's
            try:
                k = int(key[cut:])
            except ValueError:
                counts["unknown"] += 1
                continue
            if not 0 <= k < spec.capacity:
                counts["unknown"] += 1
                continue
            if seen[k]:
                counts["duplicates"] += 1
                continue
            seen[k] = 1
            arrivals[k] = now
            received.value += 1
            outcomes[str(doc.get("outcome"))] += 1
            attempts[int(doc.get("attempts", 0))] += 1
            ts = stamps[k]
            lo, hi = lat_from.value, lat_to.value
            if ts and lo and ts >= lo and (not hi or ts < hi):
                hist.record_ns(now - ts)

    def on_status(_c: Any, _u: Any, msg: Any) -> None:
        if msg.payload and orjson.loads(msg.payload).get("state") == "online":
            ch.service_ready.set()

    def on_metrics(_c: Any, _u: Any, msg: Any) -> None:
        doc = orjson.loads(msg.payload)
        if doc.get("service") == SERVICE:
            metrics.update(counters=doc.get("counters", {}), histograms=doc.get("histograms", {}))

    client.message_callback_add(topics.action_results(CONNECTOR), on_result)
    client.message_callback_add(topics.service_status(SERVICE), on_status)
    client.message_callback_add(topics.all_metrics, on_metrics)
    connect(client, spec.host, spec.port)
    subscribe(
        client,
        [(topics.action_results(CONNECTOR), 1), (topics.service_status(SERVICE), 1), (topics.all_metrics, 0)],
    )
    ch.sink_ready.set()
    loop, stop = client.loop, ch.stop_sink
    while not stop.value:
        loop(0.05)
    client.disconnect()
    return {
        "results": int(received.value),
        "outcomes": dict(outcomes),
        "attempts": {str(k): v for k, v in sorted(attempts.items())},
        "duplicates": counts["duplicates"],
        "unknown": counts["unknown"],
        "latency": latency_summary(hist),
        "metrics": metrics,
    }


# --- the run -------------------------------------------------------------------------------------------


def run_connectors_bench(
    options: ConnectorsBenchOptions, *, progress: Progress | None = None
) -> dict[str, Any]:
    """Start the store API and a fresh site in a temp dir, run every phase, return the figures."""
    say = progress or (lambda _m: None)
    started = time.monotonic()
    opts = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}
    result: dict[str, Any] = {"bench": "connectors", "machine": machine(), "options": opts}
    with workdir("outpost-bench-connectors-") as work:
        result.update(_run(options, work, say))
    result["summary"] = summarize(result)
    result["machine"]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    return result


def _start_store_api(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "store-api.log", "wb")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(
        [sys.executable, "-m", "outpost.sim.store_api", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 30.0
    while True:
        try:
            httpx.get(f"{url}/_stats", timeout=1.0).raise_for_status()
            return proc, url
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise BenchError(
                    f"the store API did not start: {(work / 'store-api.log').read_text()}"
                ) from None
            time.sleep(0.05)


def _run(o: ConnectorsBenchOptions, work: Path, say: Progress) -> dict[str, Any]:
    site = "bench-connectors"
    api, url = _start_store_api(work)
    settings = OutpostSettings(
        site=site, data_dir=work / "data", log_level="WARNING", broker=BrokerSettings(auth=False)
    )
    env = {
        "OUTPOST_CONNECTORS__DECLARED": json.dumps(connector_declaration(url, o.concurrency)),
        "OUTPOST_CONNECTORS__LOG_SYNC": o.log_sync,
        "OUTPOST_TELEMETRY__METRICS_INTERVAL_S": "1.0",
    }
    stack = Stack(settings, env=env, services={SERVICE: OutpostSettings.SERVICES[SERVICE]})
    ctx = spawn_context()
    names = ("direct", "gateway", "hops", "direct_max", "gateway_max")
    chans = {n: Channels.create(ctx) for n in names}
    stamps = {n: cast(Stamps, ctx.RawArray("q", o.capacity)) for n in ("gateway", "gateway_max")}
    arrivals = {n: cast(Stamps, ctx.RawArray("q", o.capacity)) for n in ("gateway", "gateway_max")}
    procs: list[BaseProcess] = []
    phases: dict[str, dict[str, Any]] = {}
    cpu = Procs()
    cpu.add("store_api", api.pid)
    say(f"store API on {url}; starting the site (Mosquitto, the connector gateway, log_sync {o.log_sync})")
    try:
        stack.start()
        host, port = settings.mqtt.host, settings.mqtt.port
        hops_root = f"outpost-bench/{site}/hops"
        roles: dict[str, list[tuple[str, Any, tuple[Any, ...]]]] = {
            "direct": [
                ("direct_load", run_direct, (DirectSpec(url, o.rate, o.concurrency, "dp"), chans["direct"]))
            ],
            "direct_max": [
                (
                    "direct_max_load",
                    run_direct,
                    (DirectSpec(url, 0.0, o.concurrency, "dm"), chans["direct_max"]),
                )
            ],
            "hops": [
                (
                    "hops_sink",
                    run_raw_sink,
                    (
                        SinkSpec(
                            host=host,
                            port=port,
                            site=site,
                            qos=1,
                            latency=True,
                            client_id="bench-hops-sink",
                            topic=f"{hops_root}/+",
                        ),
                        chans["hops"],
                    ),
                ),
                (
                    "hops_load",
                    run_publisher,
                    (
                        LoadSpec(
                            host=host,
                            port=port,
                            site=site,
                            qos=1,
                            devices=10,
                            rate=o.rate,
                            topic_root=hops_root,
                            client_id="bench-hops-load",
                        ),
                        chans["hops"],
                    ),
                ),
            ],
        }
        for name, prefix in (("gateway", "gp"), ("gateway_max", "gm")):
            roles[name] = [
                (
                    f"{name}_sink",
                    run_result_sink,
                    (
                        ResultSinkSpec(host, port, site, prefix, f"bench-{name}-sink", o.capacity),
                        chans[name],
                        stamps[name],
                        arrivals[name],
                    ),
                ),
                (
                    f"{name}_load",
                    run_requests,
                    (
                        RequestSpec(
                            host,
                            port,
                            site,
                            prefix,
                            o.rate if name == "gateway" else 0.0,
                            o.window,
                            f"bench-{name}-load",
                        ),
                        chans[name],
                        stamps[name],
                    ),
                ),
            ]
        byname: dict[str, BaseProcess] = {}
        for group in roles.values():
            for role, fn, args in group:
                p = ctx.Process(target=fn, args=args, name=role, daemon=True)
                p.start()
                procs.append(p)
                byname[role] = p

        def dead() -> str | None:
            for q in procs:
                if q.exitcode is not None and not (q.name.endswith("_load") and q.exitcode == 0):
                    return f"{q.name} exited with {q.exitcode}"
            if api.poll() is not None:
                return f"the store API exited with {api.returncode}"
            return None

        sinks = [c for n, c in chans.items() if n not in ("direct", "direct_max")]
        wait_ready("the subscribers", lambda: all(c.sink_ready.is_set() for c in sinks), 60, dead)
        wait_ready("the gateway online", chans["gateway"].service_ready.is_set, 90, dead)
        wait_ready("the load processes", lambda: all(c.pub_ready.is_set() for c in chans.values()), 60, dead)
        time.sleep(o.settle_s)
        for role, pid in stack_pids(stack).items():
            cpu.add(role, pid)
        for role, proc_ in byname.items():
            cpu.add(role, proc_.pid)

        profile = (
            _Profiler(cast(Any, o), {SERVICE: stack_pids(stack).get(SERVICE)}) if o.profile_dir else None
        )
        say(
            f"direct and gateway, taking turns: {o.rate:,.0f} calls/s straight to the store API "
            f"({o.concurrency} threads), then {o.rate:,.0f} ActionRequests/s through the gateway (QoS 1); "
            f"{o.warmup_s:g} s each, then {o.rounds} x {o.duration_s / o.rounds:g} s each"
        )
        paced = ("direct", "gateway")
        phases.update(
            _turns(o, {n: chans[n] for n in paced}, {n: byname[f"{n}_load"] for n in paced}, cpu, profile)
        )
        for name in paced:
            say(f"{name}: {_brief(phases[name])}")
        for name in ("hops", "direct_max", "gateway_max"):
            what = {
                "hops": f"{o.rate:,.0f} messages/s through Mosquitto alone (QoS 1)",
                "direct_max": f"flat out straight to the store API, {o.concurrency} threads",
                "gateway_max": f"ActionRequests flat out, at most {o.window:,} unanswered",
            }[name]
            say(f"{name}: {what}, {o.warmup_s:g} s + {o.duration_s:g} s")
            phases[name] = _phase(o, chans[name], byname[f"{name}_load"], cpu)
            say(f"{name}: {_brief(phases[name])}")
        for c in chans.values():
            c.stop_sink.value = 1
        for name in names:
            if name.startswith("direct"):
                phases[name]["sink"] = {}
            else:
                phases[name]["sink"] = take_result(chans[name], "sink")
        effects = httpx.get(f"{url}/_effects", timeout=60.0).json()
        if profile is not None:
            phases["gateway"]["profile"] = profile.summary()
        final = stack.supervisor.status() if stack.supervisor is not None else []
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        stack.stop()
        api.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            api.wait(10)
        if api.poll() is None:
            api.kill()
            api.wait()
    outbox = _outbox_times(work)
    for name, prefix in (("gateway", "gp"), ("gateway_max", "gm")):
        phases[name]["stages"] = stages(outbox, prefix, stamps[name], arrivals[name], chans[name])
    return {
        "phases": {n: _figures(n, phases[n], effects, stamps.get(n), chans[n]) for n in names},
        "services": {
            str(r["service"]): {"restarts": r["restarts"], "last_exit": r["last_exit"]} for r in final
        },
    }


def _outbox_times(work: Path) -> dict[str, tuple[int, int]]:
    """key -> (received_ns, settled_ns) from the gateway's outbox, read once the site has stopped."""
    found = sorted(work.glob("data/**/outbox.db"))
    if not found:
        return {}
    db = sqlite3.connect(f"file:{found[0]}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT key, received_ns, settled_ns FROM requests").fetchall()
    finally:
        db.close()
    return {str(k): (int(r or 0), int(s or 0)) for k, r, s in rows}


def stages(
    outbox: dict[str, tuple[int, int]], prefix: str, stamps: Stamps, arrivals: Stamps, ch: Channels
) -> dict[str, dict[str, float]]:
    """Where a request's time went, for those published inside the window (one clock: every process
    is on this machine): ``to_gateway`` publish -> the gateway's intake (one broker hop, the bus);
    ``in_gateway`` intake -> the call's answer back on the gateway's network thread (the outbox
    commit, the queue, the HTTP call); ``result_out`` -> the result at the subscriber (the settled
    state's commit, the publish, one broker hop)."""
    lo, hi = ch.lat_from.value, ch.lat_to.value
    hs = {n: Histogram() for n in ("to_gateway", "in_gateway", "result_out")}
    for k in range(min(ch.sent.value, len(stamps))):
        sent, got = stamps[k], arrivals[k]
        times = outbox.get(f"{prefix}-{k}")
        if not (lo <= sent < hi) or not got or times is None or not all(times):
            continue
        received, settled = times
        hs["to_gateway"].record_ns(max(0, received - sent))
        hs["in_gateway"].record_ns(max(0, settled - received))
        hs["result_out"].record_ns(max(0, got - settled))
    return {n: latency_summary(h) for n, h in hs.items()}


def _phase(o: ConnectorsBenchOptions, ch: Channels, load: BaseProcess, cpu: Procs) -> dict[str, Any]:
    """One phase on its own: its load for ``warmup_s``, then the ``duration_s`` window."""
    ch.go.value = 1
    time.sleep(o.warmup_s)
    ch.lat_from.value = time.time_ns()
    a = cpu.sample(ch)
    time.sleep(o.duration_s)
    b = cpu.sample(ch)
    ch.lat_to.value = time.time_ns()
    return _finish(o, ch, load, [(a, b)])


def _turns(
    o: ConnectorsBenchOptions,
    chans: dict[str, Channels],
    loads: dict[str, BaseProcess],
    cpu: Procs,
    profile: _Profiler | None,
) -> dict[str, dict[str, Any]]:
    """Phases to be compared, taking turns: a warm-up of each, then ``rounds`` slices of each in
    the same order, each started once the previous one's requests have all been answered (the
    loads pause while ``go`` is 0). With ``profile``, py-spy runs from the first slice to the last."""
    for ch in chans.values():  # warm-ups, outside the window
        ch.go.value = 1
        time.sleep(o.warmup_s)
        ch.go.value = 0
        _answered(o, ch)
    start = time.time_ns()
    for ch in chans.values():
        ch.lat_from.value = start
    spans: dict[str, list[tuple[Sample, Sample]]] = {name: [] for name in chans}
    if profile is not None:
        profile.start()
    for _ in range(o.rounds):
        for name, ch in chans.items():
            a = cpu.sample(ch)
            ch.go.value = 1
            time.sleep(o.duration_s / o.rounds)
            ch.go.value = 0
            spans[name].append((a, cpu.sample(ch)))
            _answered(o, ch)
    if profile is not None:
        profile.stop()
    end = time.time_ns()
    for ch in chans.values():
        ch.lat_to.value = end
    return {name: _finish(o, ch, loads[name], spans[name]) for name, ch in chans.items()}


def _answered(o: ConnectorsBenchOptions, ch: Channels) -> dict[str, Any]:
    """Wait until everything the phase's load sent is answered (or stalled: see drain_until)."""
    sent = ch.sent.value
    return drain_until(lambda: ch.received.value, lambda got: got >= sent, o.drain_s, o.stall_s)


def _finish(
    o: ConnectorsBenchOptions, ch: Channels, load: BaseProcess, spans: list[tuple[Sample, Sample]]
) -> dict[str, Any]:
    """Stop the phase's load, wait for its answers, and its figures over the measured spans."""
    ch.stop_pub.value = 1
    load.join(60.0)
    ld = take_result(ch, "load")
    drained = _answered(o, ch)
    dt = sum(b.t - a.t for a, b in spans)
    cpu: dict[str, float] = {}
    for a, b in spans:  # each span's % of a core, weighted by its length
        for role, pct in cpu_between(a, b).items():
            cpu[role] = cpu.get(role, 0.0) + pct * (b.t - a.t) / dt
    return {
        "sent": ch.sent.value,
        "received": ch.received.value,
        "window_s": round(dt, 3),
        "offered_per_s": round(sum(b.sent - a.sent for a, b in spans) / dt, 1),
        "out_per_s": round(sum(b.received - a.received for a, b in spans) / dt, 1),
        "cpu_pct": {role: round(pct, 1) for role, pct in cpu.items()},
        "drain": drained,
        "load": ld,
        "spans": len(spans),
    }


def _figures(
    name: str, p: dict[str, Any], effects: dict[str, Any], stamps: Stamps | None, ch: Channels
) -> dict[str, Any]:
    ld, sink = p["load"], p["sink"]
    out: dict[str, Any] = {
        "sent": p["sent"],
        "offered_per_s": p["offered_per_s"],
        "out_per_s": p["out_per_s"],
        "window_s": p["window_s"],
        "spans": p["spans"],
        "cpu_pct": p["cpu_pct"],
        "drain": p["drain"],
    }
    if name.startswith("direct"):
        out.update(
            answered=ld.get("answered"),
            statuses=ld.get("statuses"),
            errors=ld.get("errors"),
            latency=ld.get("latency", {}),
        )
    elif name == "hops":
        out.update(
            received=sink["readings"], missing=max(0, p["sent"] - sink["readings"]), latency=sink["latency"]
        )
    else:
        prefix = "gp-" if name == "gateway" else "gm-"
        mine = [e for k, e in effects.items() if k.startswith(prefix)]
        lo, hi = ch.lat_from.value, ch.lat_to.value
        in_window = (
            sum(1 for k in range(min(p["sent"], len(stamps))) if lo <= stamps[k] < hi)
            if stamps is not None
            else 0
        )
        out.update(
            results=sink["results"],
            outcomes=sink["outcomes"],
            attempts=sink["attempts"],
            missing=max(0, p["sent"] - sink["results"]),
            duplicates=sink["duplicates"],
            unknown=sink["unknown"],
            sent_in_window=in_window,
            latency=sink["latency"],
            peer_keys=len(mine),
            peer_effects_not_once=sum(1 for e in mine if e["effects"] != 1),
            peer_requests=sum(int(e["requests"]) for e in mine),
            publish_errors=ld.get("errors"),
            stages=p.get("stages", {}),
            gateway_counters=sink["metrics"].get("counters", {}),
            gateway_histograms=sink["metrics"].get("histograms", {}),
        )
        if "profile" in p:
            out["profile"] = p["profile"]
    return out


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The headline figures, flat, for the table, the docs and scripts."""
    ph = result["phases"]
    d, g, h = ph["direct"]["latency"], ph["gateway"]["latency"], ph["hops"]["latency"]

    def added(key: str) -> float | None:
        if key in g and key in d and g.get("count") and d.get("count"):
            return round(float(g[key]) - float(d[key]), 3)
        return None

    added_p99 = added("p99_ms")
    gm = ph["gateway_max"]
    accounted = all(
        ph[n]["missing"] == 0 and ph[n]["duplicates"] == 0 and ph[n]["peer_effects_not_once"] == 0
        for n in ("gateway", "gateway_max")
    )
    met_latency = added_p99 is not None and added_p99 <= TARGET_ADDED_P99_MS
    met_rate = gm["out_per_s"] >= TARGET_ACTIONS_PER_S
    return {
        "offered_per_s": ph["gateway"]["offered_per_s"],
        "gateway_actions_per_s": ph["gateway"]["out_per_s"],
        "gateway_max_actions_per_s": gm["out_per_s"],
        "direct_max_calls_per_s": ph["direct_max"]["out_per_s"],
        "direct_p50_ms": d.get("p50_ms"),
        "direct_p99_ms": d.get("p99_ms"),
        "gateway_p50_ms": g.get("p50_ms"),
        "gateway_p99_ms": g.get("p99_ms"),
        "added_p50_ms": added("p50_ms"),
        "added_p99_ms": added_p99,
        "hops_p50_ms": h.get("p50_ms"),
        "hops_p99_ms": h.get("p99_ms"),
        "every_request_accounted": accounted,
        "target_added_p99_ms_max": TARGET_ADDED_P99_MS,
        "target_actions_per_s_min": TARGET_ACTIONS_PER_S,
        "targets_met": {"added_p99": met_latency, "actions_per_s": met_rate},
        "all_targets_met": met_latency and met_rate and accounted,
    }


def _brief(p: dict[str, Any]) -> str:
    return (
        f"{p['sent']:,} sent, {p['received']:,} answered, {p['out_per_s']:,.0f}/s in the window; "
        f"drain {p['drain']['s']} s ({p['drain']['ended']})"
    )
