"""The telemetry benchmark: what the site sends upstream with the telemetry service's rollups,
against forwarding every validated reading raw, in one run; and how close a rolled-up p99 is to the
exact p99 of the same latencies.

One run, one fresh site (:class:`outpost.stack.Stack`: its own Mosquitto and every service, as
``outpost up`` runs them), two VictoriaMetrics servers of its own (:mod:`outpost.tsdb`), and the
simulator's retail fleet (:func:`outpost.sim.run`, ``--scenario retail``) for ``duration_s``:

* **rollups**: the telemetry service writes its windows (``telemetry.rollup_s``) to the first
  server through its own writer (influxdb-client, the v2 write API), its settings otherwise the
  shipped defaults (the upstream budget included). Bytes = the server's own
  ``vm_tcplistener_read_bytes_total`` over the run (HTTP included), less what reading that counter
  costs; per minute = bytes / (windows written x ``rollup_s``), the windows counted from the
  distinct timestamps the server holds (a point's timestamp is its window's start).
* **raw**: a subscriber process on ``.../events/+`` turns every validated reading into the line a
  raw ``reading`` point would be (:func:`outpost.services.telemetry.catalog.point`) and writes them
  with the telemetry service's own writer (influxdb-client, no compression, as the service sends)
  to the second server, ``batch_points`` lines a request or every ``raw_flush_s``; bytes counted
  the same way; per minute = bytes / the fleet's sending time.
* Both also as line-protocol bytes alone (no HTTP): the raw lines' length, and the lines of the
  points a :class:`~outpost.services.telemetry.rollup.Rollups` makes from the metrics batches and
  statuses the subscriber saw (the same batches the service rolled up). Where the site has no
  telemetry service to run, this is the rollups' figure, and the result says so.
* **p99 error**: the subscriber takes each event's latency (arrival at the subscriber less the
  reading's ``ts``, stamped by the simulator as it publishes); :mod:`.rollup_accuracy` pushes those
  samples through ``Histogram -> take_sketch -> MetricsBatch -> Rollups`` as one pseudo-service per
  device class (and one for all of them), and compares every window's rolled-up p99 with the exact
  one.

The machine's load is recorded (``machine``, CPU of every process over the load): the benchmark
shares its cores with whatever else runs.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from outpost.benchmarks.channels import Channels, reporting, spawn_context
from outpost.benchmarks.ingest import machine
from outpost.benchmarks.mqtt import connect, paho_client, subscribe
from outpost.benchmarks.phase import (
    BenchError,
    Procs,
    cpu_between,
    drain_until,
    stack_pids,
    wait_ready,
    workdir,
)
from outpost.benchmarks.rollup_accuracy import Sample, rollup_accuracy
from outpost.contracts import MetricsBatch
from outpost.services.registry import OutpostSettings
from outpost.services.telemetry.catalog import point
from outpost.services.telemetry.rollup import Rollups
from outpost.settings import BrokerSettings
from outpost.stack import Stack
from outpost.topics import Topics, device_class
from outpost.tsdb import VictoriaMetrics

SITE = "bench-telemetry"
ORG, BUCKET, TOKEN = "bench", "bench", "bench-token-not-a-secret"
TARGET_RATIO_MIN = 50.0
TARGET_P99_ERROR_PCT_MAX = 1.0
ALL = "all"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TelemetryBenchOptions:
    devices: int = 50  # the simulator's default fleet
    rate: float = 1000.0  # readings/s of the whole fleet (the simulator's default)
    duration_s: float = 180.0  # the fleet's sending time: three windows of the default rollup
    rollup_s: float = 60.0  # the telemetry service's window (its default)
    metrics_interval_s: float = 5.0  # every service's metrics batches (the default)
    seed: int = 7
    settle_s: float = 2.0  # after every service is online, before the load
    drain_s: float = 30.0  # after the load, the longest wait for the events on their way
    batch_points: int = 5000  # raw forwarding: lines a request at most (as the service's influx.batch_points)
    raw_flush_s: float = 1.0  # raw forwarding: a request at least this often while lines wait
    without: tuple[str, ...] = ()  # services of the site not started

    @classmethod
    def make(cls, *, quick: bool = False, **kw: Any) -> TelemetryBenchOptions:
        if quick:
            kw.setdefault("duration_s", 12.0)
            kw.setdefault("rollup_s", 4.0)
            kw.setdefault("metrics_interval_s", 1.0)
            kw.setdefault("devices", 20)
            kw.setdefault("rate", 200.0)
            kw.setdefault("settle_s", 1.0)
            kw.setdefault("drain_s", 10.0)
        return cls(**kw)


# --- the subscriber --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TelemetrySinkSpec:
    host: str
    port: int
    site: str
    services: tuple[str, ...]
    raw_url: str
    out_dir: str
    batch_points: int
    raw_flush_s: float
    client_id: str = "bench-telemetry-sink"


def run_telemetry_sink(spec: TelemetrySinkSpec, ch: Channels) -> None:
    """Process entry point: events (latency, raw forwarding), metrics batches and statuses."""
    with reporting(ch, "sink", spec) as result:
        result.update(_sink(spec, ch))


class _RawForwarder:
    """Every validated reading as a raw ``reading`` line, written upstream by the telemetry service's
    own :class:`~outpost.services.telemetry.writer.Writer` (influxdb-client, one request a call) from
    a thread of its own: ``batch_points`` lines a request, or what waits every ``flush_s``."""

    def __init__(self, spec: TelemetrySinkSpec) -> None:
        from pydantic import SecretStr

        from outpost.services.telemetry.settings import InfluxSettings
        from outpost.services.telemetry.writer import WriteFailed, Writer

        self.spec = spec
        cfg = InfluxSettings(url=spec.raw_url, org=ORG, bucket=BUCKET, token=SecretStr(TOKEN))
        self.writer = Writer(cfg)
        self.failures: tuple[type[BaseException], ...] = (WriteFailed,)
        self.lines: deque[str] = deque()
        self.line_bytes = 0
        self.body_bytes = 0
        self.written = 0
        self.requests = 0
        self.errors: Counter[str] = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="raw-forwarder", daemon=True)
        self.thread.start()

    def add(self, line: str) -> None:
        self.lines.append(line)
        self.line_bytes += len(line) + 1  # each line and its newline

    def _send(self, n: int) -> None:
        batch = [self.lines.popleft() for _ in range(min(n, len(self.lines)))]
        if not batch:
            return
        try:
            self.body_bytes += self.writer.write(batch)
            self.written += len(batch)
        except self.failures as exc:  # counted and reported: a lost request shows in the figures
            self.errors[str(exc)[:200]] += 1
        self.requests += 1

    def _loop(self) -> None:
        last = time.monotonic()
        while not self.stop.is_set():
            if len(self.lines) >= self.spec.batch_points or (
                self.lines and time.monotonic() - last >= self.spec.raw_flush_s
            ):
                self._send(self.spec.batch_points)
                last = time.monotonic()
            else:
                time.sleep(0.02)
        while self.lines:
            self._send(self.spec.batch_points)

    def close(self) -> dict[str, Any]:
        self.stop.set()
        self.thread.join(120)
        self.writer.close()
        return {
            "lines": self.written,
            "line_bytes": self.line_bytes,
            "body_bytes": self.body_bytes,
            "requests": self.requests,
            "errors": dict(self.errors),
        }


def _sink(spec: TelemetrySinkSpec, ch: Channels) -> dict[str, Any]:
    topics = Topics(site=spec.site)
    out = Path(spec.out_dir)
    raw = _RawForwarder(spec)
    arrivals: list[int] = []
    latencies: list[int] = []
    classes: list[str] = []
    log = (out / "metrics.jsonl").open("wb")  # ["m", arrival, batch] / ["s", arrival, service, online]
    online: set[str] = set()
    counts: Counter[str] = Counter()
    received = ch.received

    def on_events(_c: Any, _u: Any, msg: Any) -> None:
        now = time.time_ns()
        body = orjson.loads(msg.payload)
        for ev in body if isinstance(body, list) else [body]:
            device, ts = ev["device"], int(ev["ts"])
            cls = device_class(device)
            arrivals.append(now)
            latencies.append(now - ts)
            classes.append(cls)
            tags = {"device_class": cls, "device": device, "metric": ev["metric"]}
            raw.add(point("reading", spec.site, tags, {"value": float(ev["value"])}, ts).line())
        received.value = len(arrivals)

    def on_metrics(_c: Any, _u: Any, msg: Any) -> None:
        log.write(b'["m",%d,%s]\n' % (time.time_ns(), msg.payload))
        counts["metrics_batches"] += 1

    def on_status(_c: Any, _u: Any, msg: Any) -> None:
        if not msg.payload:
            return
        doc = orjson.loads(msg.payload)
        service, state = str(doc.get("service")), str(doc.get("state"))
        log.write(orjson.dumps(["s", time.time_ns(), service, state == "online"]) + b"\n")
        if state == "online":
            online.add(service)
            if online >= set(spec.services):
                ch.service_ready.set()

    client = paho_client(spec.client_id)
    client.message_callback_add(topics.all_events, on_events)
    client.message_callback_add(topics.all_metrics, on_metrics)
    client.message_callback_add(topics.all_service_status, on_status)
    connect(client, spec.host, spec.port)
    subscribe(client, [(topics.all_events, 1), (topics.all_metrics, 0), (topics.all_service_status, 1)])
    ch.sink_ready.set()
    loop, stop = client.loop, ch.stop_sink
    while not stop.value:
        loop(0.05)
    client.disconnect()
    log.close()
    import numpy as np

    names = sorted(set(classes))
    index = {c: i for i, c in enumerate(names)}
    np.save(out / "arrivals.npy", np.asarray(arrivals, dtype=np.int64))
    np.save(out / "latencies.npy", np.asarray(latencies, dtype=np.int64))
    np.save(out / "classes.npy", np.asarray([index[c] for c in classes], dtype=np.int16))
    return {
        "events": len(arrivals),
        "device_classes": names,
        "metrics_batches": counts["metrics_batches"],
        "raw": raw.close(),
    }


# --- the run ---------------------------------------------------------------------------------------


def run_telemetry_bench(
    options: TelemetryBenchOptions, *, progress: Progress | None = None
) -> dict[str, Any]:
    """Start a fresh site and two time-series servers in a temp dir, play the retail fleet, and
    return the figures (the ``--json`` object)."""
    say = progress or (lambda _m: None)
    started = time.monotonic()
    result: dict[str, Any] = {
        "bench": "telemetry",
        "machine": machine(),
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items()},
    }
    with workdir("outpost-bench-telemetry-") as work:
        result.update(_run(options, work, say))
    result["summary"] = summarize(result)
    result["machine"]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    return result


def _read_cost(vm: VictoriaMetrics) -> int:
    """Bytes one read of the counter adds to it (the request itself), so it can be taken off."""
    a = vm.bytes_received()
    b = vm.bytes_received()
    return max(0, b - a)


def _run(o: TelemetryBenchOptions, work: Path, say: Progress) -> dict[str, Any]:
    from outpost.sim import SimOptions
    from outpost.sim import run as run_sim

    settings = OutpostSettings(
        site=SITE, data_dir=work / "data", log_level="WARNING", broker=BrokerSettings(auth=False)
    )
    known = dict(type(settings).SERVICES)
    if set(o.without) - set(known):
        raise BenchError(f"unknown service {sorted(set(o.without) - set(known))}; known: {', '.join(known)}")
    if "ingest" in o.without:
        raise BenchError("the benchmark needs ingest (the raw baseline is its validated readings)")
    services = {k: v for k, v in known.items() if k not in o.without}
    service_runs = "telemetry" in services
    say("starting two VictoriaMetrics (rollups, raw)")
    vm_up = VictoriaMetrics(work / "vm-rollups", die_with_parent=True).start()
    vm_raw = VictoriaMetrics(work / "vm-raw", die_with_parent=True).start()
    stack: Stack | None = None
    ctx = spawn_context()
    ch = Channels.create(ctx)
    sink_dir = work / "sink"
    sink_dir.mkdir()
    sink_p = None
    try:
        cost_up, cost_raw = _read_cost(vm_up), _read_cost(vm_raw)
        up0, raw0 = vm_up.bytes_received(), vm_raw.bytes_received()
        env = {"OUTPOST_TELEMETRY__METRICS_INTERVAL_S": str(o.metrics_interval_s)}
        if service_runs:  # the core's telemetry settings know only the interval
            env |= {
                "OUTPOST_TELEMETRY__ROLLUP_S": str(o.rollup_s),
                "OUTPOST_TELEMETRY__INFLUX__URL": vm_up.url,
                "OUTPOST_TELEMETRY__INFLUX__ORG": ORG,
                "OUTPOST_TELEMETRY__INFLUX__BUCKET": BUCKET,
                "OUTPOST_TELEMETRY__INFLUX__TOKEN": TOKEN,
            }
        stack = Stack(settings, env=env, services=services)
        say(f"starting the site (Mosquitto, {', '.join(services)})")
        stack.start()
        spec = TelemetrySinkSpec(
            host=settings.mqtt.host,
            port=settings.mqtt.port,
            site=SITE,
            services=tuple(services),
            raw_url=vm_raw.url,
            out_dir=str(sink_dir),
            batch_points=o.batch_points,
            raw_flush_s=o.raw_flush_s,
        )
        sink_p = ctx.Process(target=run_telemetry_sink, args=(spec, ch), name="bench-sink", daemon=True)
        sink_p.start()

        def dead() -> str | None:
            if sink_p is not None and sink_p.exitcode is not None:
                got = ch.take_results(1, 0.5).get("sink", {})
                return f"the subscriber exited with {sink_p.exitcode}: {str(got.get('error', ''))[-2000:]}"
            return None

        wait_ready("the subscriber", ch.sink_ready.is_set, 60, dead)
        wait_ready("every service online", ch.service_ready.is_set, 120, dead)
        time.sleep(o.settle_s)
        cpu = Procs()
        for role, pid in stack_pids(stack).items():
            cpu.add(role, pid)
        cpu.add("subscriber", sink_p.pid)
        sim = SimOptions.from_settings(
            settings,
            devices=o.devices,
            rate=o.rate,
            duration=o.duration_s,
            seed=o.seed,
            scenario="retail",
            churn=0.0,
            processes=1,
        )
        say(
            f"retail fleet: {o.devices} devices, {o.rate:,.0f} readings/s for {o.duration_s:g} s "
            f"(rollup windows of {o.rollup_s:g} s)"
        )
        a = cpu.sample(ch)
        report = run_sim(sim)
        b = cpu.sample(ch)
        drained = drain_until(
            lambda: ch.received.value, lambda got: got >= report.sent_readings, o.drain_s, 3.0
        )
        say(f"{report.sent_readings:,} readings sent, {ch.received.value:,} events seen ({drained['ended']})")
        if service_runs:
            # the last window with load in it closes, is rolled up and written before the site stops
            end = time.time() + o.metrics_interval_s
            close_at = (end // o.rollup_s + 1) * o.rollup_s + o.metrics_interval_s + 2.0
            say(f"waiting {close_at - time.time():.0f} s for the last window to close and be written")
            time.sleep(max(0.0, close_at - time.time()))
        final = stack.supervisor.status() if stack.supervisor is not None else []
        stack.stop()  # the services' last batches; the telemetry service writes what it holds
        stack = None
        ch.stop_sink.value = 1
        got = ch.take_results(1, 180).get("sink")
        sink_p.join(30)
        if got is None:
            raise BenchError("the subscriber did not report")
        if "error" in got:
            raise BenchError(f"the subscriber failed:\n{got['error']}")
        up_bytes = vm_up.bytes_received() - up0 - cost_up
        raw_bytes = vm_raw.bytes_received() - raw0 - cost_raw
        say("reading back what both servers hold")
        written = _rollups_written(vm_up) if service_runs else None
        raw_points = sum(len(s["values"]) for s in vm_raw.export('{__name__="reading_value"}'))
    finally:
        if sink_p is not None and sink_p.is_alive():
            sink_p.terminate()
            sink_p.join(5)
        if stack is not None:
            stack.stop()
        vm_up.stop()
        vm_raw.stop()
    offline = _offline_rollups(sink_dir / "metrics.jsonl", o.rollup_s)
    say("rolled-up p99 against the exact p99 of the events' latencies")
    accuracy = _accuracy(sink_dir, got["device_classes"], o)
    return {
        "sim": report.model_dump(mode="json"),
        "drain": drained,
        "events": got["events"],
        "cpu_pct": cpu_between(a, b),
        "services": {str(r["service"]): {"restarts": r["restarts"], "state": r["state"]} for r in final},
        "telemetry_service_ran": service_runs,
        "rollups": {
            "wire_bytes": up_bytes if service_runs else None,
            "written": written,
            "line_protocol": offline,
        },
        "raw": {
            "wire_bytes": raw_bytes,
            "points_stored": raw_points,
            **got["raw"],
        },
        "p99_accuracy": accuracy,
    }


def _rollups_written(vm: VictoriaMetrics) -> dict[str, Any]:
    """What the telemetry service wrote: series, field values, and windows (distinct timestamps)."""
    series = vm.export('{__name__=~".+"}')
    stamps: Counter[int] = Counter()
    names: set[str] = set()
    for s in series:
        names.add(str(s["metric"].get("__name__")))
        stamps.update(int(t) for t in s["timestamps"])
    return {
        "series": len(series),
        "field_values": sum(stamps.values()),  # one per field of each point (a series is m_f)
        "windows": len(stamps),
        "field_values_per_window": [stamps[t] for t in sorted(stamps)],
        "series_names": sorted(names),
    }


def _offline_rollups(path: Path, window_s: float) -> dict[str, Any]:
    """The points a Rollups makes from the batches and statuses the subscriber saw, as line protocol."""
    rollups = Rollups(SITE, window_s, started_ns=None)
    bad = 0
    last = 0
    service_counters: dict[str, int] = {}
    for line in path.read_bytes().splitlines():
        doc = orjson.loads(line)
        last = max(last, int(doc[1]))
        if doc[0] == "s":
            rollups.status(str(doc[2]), bool(doc[3]), int(doc[1]))
            continue
        try:
            batch = MetricsBatch.model_validate(doc[2])
        except ValueError:
            bad += 1
            continue
        rollups.add(batch, int(doc[1]))
        if batch.service == "telemetry":
            service_counters = dict(batch.counters)
    points = rollups.close(last + int(2 * window_s * 1e9))
    windows = sorted({p.ts_ns for p in points})
    line_bytes = sum(len(p.line()) + 1 for p in points)
    per_window = Counter(p.ts_ns for p in points)
    return {
        "points": len(points),
        "windows": len(windows),
        "bytes": line_bytes,
        "points_per_window": [per_window[t] for t in windows],
        "batches_refused": bad,
        # the telemetry service's own counters in its last batch (bytes_sent: line protocol bodies)
        "telemetry_service_counters": {
            k: v
            for k, v in sorted(service_counters.items())
            if k.split(".")[0] in ("windows", "points", "writes", "bytes_sent", "write_failures")
            or k.startswith(("points_sent", "points_downsampled", "points_dropped"))
        },
    }


def _accuracy(sink_dir: Path, classes: list[str], o: TelemetryBenchOptions) -> dict[str, Any]:
    import numpy as np

    arrivals = np.load(sink_dir / "arrivals.npy")
    latencies = np.load(sink_dir / "latencies.npy")
    cls = np.load(sink_dir / "classes.npy")
    samples: list[Sample] = []
    for t, lat, c in zip(arrivals.tolist(), latencies.tolist(), cls.tolist(), strict=True):
        samples.append(Sample(t, max(int(lat), 0), f"bench-{classes[c]}"))
        samples.append(Sample(t, max(int(lat), 0), f"bench-{ALL}"))
    return rollup_accuracy(samples, site=SITE, window_s=o.rollup_s, interval_s=o.metrics_interval_s)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The headline figures: bytes per device per minute, rollups and raw, their ratio, the p99 error."""
    o = result["options"]
    devices = o["devices"]
    sim_min = max(result["sim"]["elapsed_s"], 1e-9) / 60.0
    ru, rw = result["rollups"], result["raw"]
    raw_wire = rw["wire_bytes"] / devices / sim_min
    raw_line = rw["line_bytes"] / devices / sim_min
    off = ru["line_protocol"]
    up_line = off["bytes"] / max(off["windows"], 1) * 60.0 / o["rollup_s"] / devices
    if result["telemetry_service_ran"] and ru["written"] and ru["written"]["windows"]:
        up_wire: float | None = ru["wire_bytes"] / ru["written"]["windows"] * 60.0 / o["rollup_s"] / devices
        source = "wire: vm_tcplistener_read_bytes_total of the server the telemetry service wrote to"
        ratio = raw_wire / up_wire if up_wire else None
    else:
        up_wire = None
        source = (
            "line protocol of the points outpost.services.telemetry.rollup.Rollups made from the "
            "run's metrics batches (the telemetry service was not run): no HTTP on either side"
        )
        ratio = raw_line / up_line if up_line else None
    err = result["p99_accuracy"]["p99_error_pct"]
    ratio_met = ratio is not None and ratio >= TARGET_RATIO_MIN
    err_met = err is not None and err <= TARGET_P99_ERROR_PCT_MAX
    return {
        "devices": devices,
        "readings_per_device_per_s": round(result["sim"]["sent_readings"] / devices / (sim_min * 60), 2),
        "rollup_bytes_per_device_per_min": round(up_wire, 1) if up_wire is not None else None,
        "raw_bytes_per_device_per_min": round(raw_wire, 1),
        "rollup_line_bytes_per_device_per_min": round(up_line, 1),
        "raw_line_bytes_per_device_per_min": round(raw_line, 1),
        "raw_over_rollups": round(ratio, 1) if ratio is not None else None,
        "raw_over_rollups_line_protocol": round(raw_line / up_line, 1) if up_line else None,
        "rollup_bytes_source": source,
        "p99_error_pct": err,
        "p99_error_pct_mean": result["p99_accuracy"]["p99_error_pct_mean"],
        "p99_series_windows": result["p99_accuracy"]["series_windows"],
        "targets": {"raw_over_rollups_min": TARGET_RATIO_MIN, "p99_error_pct_max": TARGET_P99_ERROR_PCT_MAX},
        "targets_met": {"bytes": ratio_met, "p99": err_met},
        "all_targets_met": ratio_met and err_met,
    }


def print_telemetry(result: dict[str, Any], out: Any) -> None:
    """The figures as a few lines for people (``out``: a rich Console)."""
    s = result["summary"]
    tg = s["targets"]
    up = s["rollup_bytes_per_device_per_min"]
    out.print(
        f"retail fleet: {s['devices']} devices, {s['readings_per_device_per_s']} readings/s each, "
        f"{result['events']:,} events"
    )
    if up is not None:
        out.print(f"rollups upstream: {up:,.1f} bytes/device/min on the wire")
    out.print(
        f"  line protocol alone: rollups {s['rollup_line_bytes_per_device_per_min']:,.1f}, "
        f"raw {s['raw_line_bytes_per_device_per_min']:,.1f} bytes/device/min"
    )
    out.print(f"raw forwarding: {s['raw_bytes_per_device_per_min']:,.1f} bytes/device/min on the wire")
    out.print(
        f"raw / rollups: {s['raw_over_rollups']}x (target >= {tg['raw_over_rollups_min']:g}x: "
        f"{'met' if s['targets_met']['bytes'] else 'MISSED'}); {s['rollup_bytes_source']}"
    )
    out.print(
        f"rolled-up p99 vs exact: worst {s['p99_error_pct']}%, mean {s['p99_error_pct_mean']}% over "
        f"{s['p99_series_windows']} series-windows (target <= {tg['p99_error_pct_max']:g}%: "
        f"{'met' if s['targets_met']['p99'] else 'MISSED'})"
    )
