"""The agent benchmark: the whole pipeline (ingest, inference, agents) at a fixed offered rate, next
to the broker hops alone, in one run on one site.

The site is the real one (:class:`outpost.stack.Stack`: its own Mosquitto and every service, as
``outpost up`` runs them), with one agent declared through the site file and no shipped pack: it
senses the shelf-stock model's scores and decides on every one (a rule that always holds, no
cooldown, limits and breaker far above the load, no escalation threshold, drift off), dry-run by default, so
that nothing but the decision leaves it; ``act`` makes it ask a capability of a connector nobody
serves instead (the action request is written to the outbox and published as well).

Two phases, one after the other, each paced open loop at ``rate`` readings/s, QoS 1, by a publisher
process of its own, with a subscriber process at the far end:

* ``hops``: the broker alone: readings published to a topic outside the site (no service reads
  it), straight back to a subscriber: one raw round trip through Mosquitto, the floor of every hop;
* ``pipeline``: ``shelf_weight`` readings from ``devices`` shelf devices to their telemetry topics:
  ingest validates them into events, inference scores them with shelf-stock, the agent decides, and
  the subscriber reads the decisions (four hops through the broker). A decision's ``trace`` is its
  reading's id (``reading_id(site, device, seq)``, which ingest gives the event and inference
  passes on), so the subscriber finds each decision's reading, and its send time in an array the
  publisher writes (``ts`` is taken just before the reading is published).

Latency is send time -> arrival at the subscriber, for readings sent inside the measurement window
(after ``warmup_s``). What is counted, honestly: the readings sent inside the window, the decisions
that arrived for them (inference scores a device's reading only once its window holds the model's
``min_readings``: the first few readings of each device, all in the warm-up, are not scored; any
other reading without a decision is reported missing), duplicates and decisions for readings not
sent by this run. Decisions/s is distinct decisions per second over the window. CPU per process
(every service, Mosquitto, the benchmark's own processes) over each window, as the other
benchmarks; with ``profile_dir``, py-spy samples every service during the pipeline's window and the
result lists where their time went.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import orjson
import yaml

from outpost.benchmarks.channels import Channels, reporting, spawn_context
from outpost.benchmarks.ingest import machine
from outpost.benchmarks.load import LoadSpec, Stamps, run_publisher
from outpost.benchmarks.mqtt import connect, paho_client, subscribe
from outpost.benchmarks.phase import (
    BenchError,
    Procs,
    cpu_between,
    drain_until,
    stack_pids,
    take_result,
    wait_ready,
    workdir,
)
from outpost.benchmarks.sinks import SinkSpec, latency_summary, run_raw_sink
from outpost.contracts import reading_id_prefix
from outpost.metrics import Histogram
from outpost.services.registry import OutpostSettings
from outpost.settings import BrokerSettings
from outpost.stack import Stack
from outpost.topics import Topics

TARGET_P99_MS = 50.0
AGENT = "bench"
CAPABILITY = "bench.decide"
DEVICE_PREFIX = "shelf"
METRIC, UNIT = "shelf_weight", "kg"
MODEL = "shelf-stock"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class AgentBenchOptions:
    rate: float = 2000.0  # readings/s offered in both phases
    devices: int = 100  # shelf devices, round-robin (rate / devices readings/s each)
    duration_s: float = 10.0  # the measurement window of each phase
    warmup_s: float = 2.0  # load before the window opens
    settle_s: float = 3.0  # after every service is online, before any load (models load, caches fill)
    qos: int = 1
    act: bool = False  # the agent acts (an action request to a connector nobody serves), not dry-run
    drain_s: float = 15.0  # after the window, the longest wait for what is on its way
    stall_s: float = 3.0  # ... or until nothing more arrived for this long
    metrics_interval_s: float = 1.0  # the services' telemetry.metrics_interval_s
    profile_dir: Path | None = None  # py-spy every service during the pipeline's window
    profile_rate: int = 100  # py-spy samples/s (each sampler costs CPU on the same cores)
    profile_idle: bool = False  # sample waiting threads too (py-spy --idle): where a thread blocks
    without: tuple[str, ...] = ()  # services of the site not started (memory: the pipeline alone)

    @classmethod
    def make(cls, *, quick: bool = False, **kw: Any) -> AgentBenchOptions:
        if quick:
            kw.setdefault("duration_s", 3.0)
            kw.setdefault("warmup_s", 1.0)
            kw.setdefault("drain_s", 8.0)
            kw.setdefault("settle_s", 1.0)
        return cls(**kw)

    @property
    def capacity(self) -> int:
        """Readings whose send time is kept: more than the publisher can send before it is stopped."""
        return int(self.rate * (self.warmup_s + self.duration_s) * 1.25) + 10 * self.devices + 1000


def unscored_per_device() -> int:
    """Readings of a device inference does not score: those before its window holds the shipped
    shelf-stock model's ``min_readings``."""
    from outpost.services.inference.manifest import read_manifest
    from outpost.services.inference.registry import PACKAGED_MODELS

    folder = max((PACKAGED_MODELS / MODEL).iterdir(), key=lambda p: p.name)
    return read_manifest(folder).min_readings - 1


def agent_declaration(act: bool) -> dict[str, Any]:
    """The bench agent: a decision for every shelf-stock score, nothing that would hold one back."""
    return {
        "description": "outpost bench agent: decides on every shelf-stock score",
        "sense": [f"inference/{MODEL}/+"],
        "rules": [
            {
                "name": "every score",
                "when": {"kind": "score", "model": MODEL},
                "do": [CAPABILITY],
                "args": {"shelf": "{device}", "label": "{label}", "score": "{score}"},
                "confidence": 1.0,
            }
        ],
        "may": [CAPABILITY],
        "limits": {"actions_per_minute": 100_000_000, "cost_per_hour": 1e12, "steps_per_task": 8},
        # with --act the site's connector gateway answers each request for the undeclared connector
        # with a failure: the breaker must not open (it would turn the decisions into escalations)
        "breaker": {"failures": 1_000_000_000},
        "escalation": {"below": 0.0},
        "drift": {"enabled": False},
        "dry_run": not act,
    }


def site_document(act: bool) -> dict[str, Any]:
    return {"agents": {"packs": [], "declared": {AGENT: agent_declaration(act)}}}


# --- the decision subscriber ---------------------------------------------------------------------


@dataclass(frozen=True)
class DecisionSinkSpec:
    host: str
    port: int
    site: str
    devices: int
    capacity: int  # readings indexed (k = seq * devices + device, as the publisher sends them)
    services: tuple[str, ...]
    agent: str = AGENT
    device_prefix: str = DEVICE_PREFIX
    client_id: str = "bench-decisions"


def run_decision_sink(spec: DecisionSinkSpec, ch: Channels, stamps: Stamps) -> None:
    """Process entry point: the agent's decisions (latency from the reading's send time), the
    services' metrics and statuses (``service_ready`` once every one is online)."""
    with reporting(ch, "decision_sink", spec) as result:
        result.update(_decisions(spec, ch, stamps))


def reading_index(site: str, devices: int, capacity: int, prefix: str = DEVICE_PREFIX) -> dict[str, int]:
    """reading id -> its index in the publisher's order (device ``k % devices``, seq ``k // devices``),
    computed as ingest does (:func:`outpost.contracts.reading_id`, epoch 0: a fresh site)."""
    import hashlib

    bases = [
        hashlib.blake2b(reading_id_prefix(site, f"{prefix}-{d:05d}"), digest_size=12) for d in range(devices)
    ]
    out: dict[str, int] = {}
    for k in range(capacity):
        h = bases[k % devices].copy()
        h.update(b"%d" % (k // devices))
        out[h.hexdigest()] = k
    return out


def _decisions(spec: DecisionSinkSpec, ch: Channels, stamps: Stamps) -> dict[str, Any]:
    topics = Topics(site=spec.site)
    index = reading_index(spec.site, spec.devices, spec.capacity, spec.device_prefix)
    client = paho_client(spec.client_id)
    received, lat_from, lat_to = ch.received, ch.lat_from, ch.lat_to
    hist = Histogram()
    seen: set[int] = set()
    in_window = [0]
    counts: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    metrics: dict[str, dict[str, Any]] = {}
    online: set[str] = set()
    last_status: dict[str, str] = {}

    def on_decision(_c: Any, _u: Any, msg: Any) -> None:
        now = time.time_ns()
        body = orjson.loads(msg.payload)
        for doc in body if isinstance(body, list) else [body]:  # a commit's decisions, one message
            k = index.get(doc.get("trace", ""))
            if k is None:
                counts["unknown"] += 1
                continue
            if k in seen:
                counts["duplicates"] += 1
                continue
            seen.add(k)
            received.value = len(seen)
            kinds[f"{doc.get('kind')}{' (dry run)' if doc.get('dry_run') else ''}"] += 1
            ts = stamps[k]
            lo, hi = lat_from.value, lat_to.value
            if ts and lo and ts >= lo and (not hi or ts < hi):
                in_window[0] += 1
                hist.record_ns(now - ts)

    def on_metrics(_c: Any, _u: Any, msg: Any) -> None:
        doc = orjson.loads(msg.payload)
        metrics[str(doc.get("service"))] = {
            "counters": doc.get("counters", {}),
            "histograms": doc.get("histograms", {}),
        }

    def on_status(_c: Any, _u: Any, msg: Any) -> None:
        if not msg.payload:
            return
        doc = orjson.loads(msg.payload)
        service, state = str(doc.get("service")), str(doc.get("state"))
        last_status[service] = state
        if state == "online":
            online.add(service)
            if online >= set(spec.services):
                ch.service_ready.set()

    client.message_callback_add(topics.decisions(spec.agent), on_decision)
    client.message_callback_add(topics.all_metrics, on_metrics)
    for s in spec.services:
        client.message_callback_add(topics.service_status(s), on_status)
    connect(client, spec.host, spec.port)
    subscribe(
        client,
        [
            (topics.decisions(spec.agent), 1),
            (topics.all_metrics, 0),
            *((topics.service_status(s), 1) for s in spec.services),
        ],
    )
    ch.sink_ready.set()
    loop, stop = client.loop, ch.stop_sink
    while not stop.value:
        loop(0.05)
    # the services' last metrics (published as they stop) may still be on their way
    quiet_until = time.monotonic() + 0.5
    while time.monotonic() < quiet_until:
        loop(0.05)
    client.disconnect()
    return {
        "decided": len(seen),
        "decided_in_window": in_window[0],
        "duplicates": counts["duplicates"],
        "unknown": counts["unknown"],
        "kinds": dict(kinds),
        "latency": latency_summary(hist),
        "metrics": metrics,
        "last_status": last_status,
    }


# --- the run ---------------------------------------------------------------------------------------


def run_agent_bench(options: AgentBenchOptions, *, progress: Progress | None = None) -> dict[str, Any]:
    """Start a fresh site in a temp dir, run the hops then the pipeline phase, return the figures."""
    say = progress or (lambda _m: None)
    started = time.monotonic()
    result: dict[str, Any] = {"bench": "agent", "machine": machine(), "options": _jsonable(asdict(options))}
    with workdir("outpost-bench-agent-") as work:
        result.update(_run(options, work, say))
    result["summary"] = summarize(result)
    result["machine"]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    return result


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def _run(o: AgentBenchOptions, work: Path, say: Progress) -> dict[str, Any]:
    site = "bench-agent"
    site_file = work / "outpost.yaml"
    site_file.write_text(yaml.safe_dump(site_document(o.act), sort_keys=False))
    settings = OutpostSettings(
        site=site, data_dir=work / "data", log_level="WARNING", broker=BrokerSettings(auth=False)
    )
    env = {
        "OUTPOST_CONFIG": str(site_file),
        "OUTPOST_TELEMETRY__METRICS_INTERVAL_S": str(o.metrics_interval_s),
    }
    known = dict(type(settings).SERVICES)
    if set(o.without) - set(known):
        raise BenchError(f"unknown service {sorted(set(o.without) - set(known))}; known: {', '.join(known)}")
    missing = {"ingest", "inference", "agents"} & set(o.without)
    if missing:
        raise BenchError(f"the pipeline needs {', '.join(sorted(missing))}")
    run = {k: v for k, v in known.items() if k not in o.without}
    stack = Stack(settings, env=env, services=run)
    ctx = spawn_context()
    hops_ch, pipe_ch = Channels.create(ctx), Channels.create(ctx)
    stamps: Stamps = ctx.RawArray("q", o.capacity)
    procs: list[BaseProcess] = []
    say(f"starting the site (Mosquitto, {', '.join(run)})")
    try:
        stack.start()
        host, port = settings.mqtt.host, settings.mqtt.port
        services = tuple(run)
        hops_root = f"outpost-bench/{site}/hops"
        common: dict[str, Any] = {
            "host": host,
            "port": port,
            "site": site,
            "qos": o.qos,
            "devices": o.devices,
            "rate": o.rate,
            "metric": METRIC,
            "unit": UNIT,
            "device_prefix": DEVICE_PREFIX,
        }
        hops_load = LoadSpec(**common, topic_root=hops_root, client_id="bench-hops-load")
        pipe_load = LoadSpec(**common, client_id="bench-pipeline-load")
        hops_sink = SinkSpec(
            host=host,
            port=port,
            site=site,
            qos=o.qos,
            latency=True,
            client_id="bench-hops-sink",
            topic=f"{hops_root}/+",
        )
        decisions = DecisionSinkSpec(
            host=host, port=port, site=site, devices=o.devices, capacity=o.capacity, services=services
        )
        roles: list[tuple[str, Any, tuple[Any, ...]]] = [
            ("hops_sink", run_raw_sink, (hops_sink, hops_ch)),
            ("decision_sink", run_decision_sink, (decisions, pipe_ch, stamps)),
            ("hops_load", run_publisher, (hops_load, hops_ch)),
            ("pipeline_load", run_publisher, (pipe_load, pipe_ch, stamps)),
        ]
        byname: dict[str, BaseProcess] = {}
        for role, fn, args in roles:
            p = ctx.Process(target=fn, args=args, name=role, daemon=True)
            p.start()
            procs.append(p)
            byname[role] = p

        def dead() -> str | None:
            for q in procs:
                if q.exitcode is not None and not (q.name.endswith("_load") and q.exitcode == 0):
                    return f"{q.name} exited with {q.exitcode}"
            return None

        wait_ready(
            "the subscribers", lambda: hops_ch.sink_ready.is_set() and pipe_ch.sink_ready.is_set(), 60, dead
        )
        wait_ready("every service online", pipe_ch.service_ready.is_set, 90, dead)
        wait_ready(
            "the publishers", lambda: hops_ch.pub_ready.is_set() and pipe_ch.pub_ready.is_set(), 30, dead
        )
        time.sleep(o.settle_s)
        cpu = Procs()
        for role, pid in stack_pids(stack).items():
            cpu.add(role, pid)
        for role, proc_ in byname.items():
            cpu.add(role, proc_.pid)

        say(f"hops: {o.rate:,.0f} readings/s through Mosquitto alone, {o.warmup_s:g} s + {o.duration_s:g} s")
        hops = _phase("hops", o, hops_ch, byname["hops_load"], cpu, None)
        say(f"hops: {_brief(hops)}")
        say(
            f"pipeline: {o.rate:,.0f} readings/s from {o.devices} shelves through ingest, inference "
            f"and the agent, {o.warmup_s:g} s + {o.duration_s:g} s"
        )
        profile = _Profiler(o, stack_pids(stack)) if o.profile_dir is not None else None
        unscored = o.devices * unscored_per_device()
        pipeline = _phase("pipeline", o, pipe_ch, byname["pipeline_load"], cpu, profile, unscored)
        pipeline["unscored"] = unscored
        pipeline["sent_in_window"] = _in_window(stamps, pipeline["sent"], pipe_ch)
        final = stack.supervisor.status() if stack.supervisor is not None else []
        if stack.supervisor is not None:
            stack.supervisor.stop(grace_s=10.0)  # their last metrics batch goes out on the way
        time.sleep(0.5)
        hops_ch.stop_sink.value = pipe_ch.stop_sink.value = 1
        hops["sink"] = take_result(hops_ch, "sink")
        pipeline["sink"] = take_result(pipe_ch, "decision_sink")
        hops["load"], pipeline["load"] = hops.pop("_load"), pipeline.pop("_load")
        if profile is not None:
            pipeline["profile"] = profile.summary()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        stack.stop()
    return {
        "phases": {"hops": _hops_figures(hops), "pipeline": _pipeline_figures(pipeline, o)},
        "services": {
            str(r["service"]): {"restarts": r["restarts"], "last_exit": r["last_exit"]} for r in final
        },
    }


def _phase(
    name: str,
    o: AgentBenchOptions,
    ch: Channels,
    publisher: BaseProcess,
    cpu: Procs,
    profile: _Profiler | None,
    unscored: int = 0,
) -> dict[str, Any]:
    ch.go.value = 1
    time.sleep(o.warmup_s)
    ch.lat_from.value = time.time_ns()
    a = cpu.sample(ch)
    if profile is not None:
        profile.start()
    time.sleep(o.duration_s)
    b = cpu.sample(ch)
    ch.lat_to.value = time.time_ns()
    ch.stop_pub.value = 1
    publisher.join(30.0)
    load = ch.take_results(1, 5).get("load")
    if load is None:
        raise BenchError(f"{name}: the publisher did not report")
    if "error" in load:
        raise BenchError(f"{name}: the publisher failed:\n{load['error']}")
    sent = ch.sent.value
    drained = _drain(o, ch, sent - unscored)
    if profile is not None:
        profile.stop()
    dt = b.t - a.t
    return {
        "sent": sent,
        "received": ch.received.value,
        "window_s": round(dt, 3),
        "offered_per_s": round((b.sent - a.sent) / dt, 1),
        "out_per_s": round((b.received - a.received) / dt, 1),
        "cpu_pct": cpu_between(a, b),
        "drain": drained,
        "_load": load,
    }


def _drain(o: AgentBenchOptions, ch: Channels, sent: int) -> dict[str, Any]:
    """Until the subscriber has ``sent`` (for the pipeline: what was sent less the readings inference
    does not score), ``drain_s`` passed, or ``stall_s`` with nothing new."""
    return drain_until(lambda: ch.received.value, lambda got: got >= sent, o.drain_s, o.stall_s)


def _in_window(stamps: Stamps, sent: int, ch: Channels) -> int:
    lo, hi = ch.lat_from.value, ch.lat_to.value
    return sum(1 for k in range(min(sent, len(stamps))) if lo <= stamps[k] < hi)


def _load_figures(ld: dict[str, Any]) -> dict[str, Any]:
    return {
        "sent": ld.get("sent", 0),
        "acked": ld.get("acked"),
        "errors": ld.get("errors"),
        "publish_s": round(float(ld.get("elapsed_s", 0.0)), 3),
        "message_bytes": round(float(ld.get("payload_bytes_mean", 0.0))),
    }


def _hops_figures(p: dict[str, Any]) -> dict[str, Any]:
    sink = p["sink"]
    return {
        "sent": p["sent"],
        "received": sink["readings"],
        "missing": max(0, p["sent"] - sink["readings"]),
        "offered_per_s": p["offered_per_s"],
        "received_per_s": p["out_per_s"],
        "latency": sink["latency"],
        "load": _load_figures(p["load"]),
        "cpu_pct": p["cpu_pct"],
        "drain": p["drain"],
    }


def _pipeline_figures(p: dict[str, Any], o: AgentBenchOptions) -> dict[str, Any]:
    sink = p["sink"]
    m = sink["metrics"]

    def counters(service: str, *names: str) -> dict[str, Any]:
        c = m.get(service, {}).get("counters", {})
        return {n: c.get(n, 0) for n in names if n in c} | {
            k: v for k, v in c.items() if any(k.startswith(n + ".") for n in names)
        }

    out: dict[str, Any] = {
        "devices": o.devices,
        "sent": p["sent"],
        "sent_in_window": p["sent_in_window"],
        "decided": sink["decided"],
        "decided_in_window": sink["decided_in_window"],
        "missing_in_window": max(0, p["sent_in_window"] - sink["decided_in_window"]),
        "unscored_expected": p["unscored"],  # each device's first min_readings - 1: inference's warming
        "not_decided": p["sent"] - sink["decided"],  # whole run: = unscored_expected when all arrived
        "duplicates": sink["duplicates"],
        "unknown": sink["unknown"],
        "kinds": sink["kinds"],
        "offered_per_s": p["offered_per_s"],
        "decisions_per_s": p["out_per_s"],
        "latency": sink["latency"],
        "load": _load_figures(p["load"]),
        "cpu_pct": p["cpu_pct"],
        "drain": p["drain"],
        # the services' own figures, as their last metrics batch had them (cumulative since start)
        "service_counters": {
            "ingest": counters("ingest", "accepted", "rejected", "events", "published"),
            "inference": counters("inference", "requests", "scored", "warming", "rejected"),
            "agents": counters("agents", "commits", "actions", "skipped", "policy_errors", "commit_failures"),
        },
        "service_histograms": {s: v.get("histograms", {}) for s, v in sorted(m.items())},
        "last_status": sink["last_status"],
    }
    if "profile" in p:
        out["profile"] = p["profile"]
    return out


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The headline figures, flat, for the table, the docs and scripts."""
    h, p = result["phases"]["hops"], result["phases"]["pipeline"]
    p99 = p["latency"].get("p99_ms")
    met = bool(p["latency"].get("count")) and p99 is not None and p99 < TARGET_P99_MS
    return {
        "offered_per_s": p["offered_per_s"],
        "decisions_per_s": p["decisions_per_s"],
        "pipeline_p50_ms": p["latency"].get("p50_ms"),
        "pipeline_p99_ms": p99,
        "hops_p50_ms": h["latency"].get("p50_ms"),
        "hops_p99_ms": h["latency"].get("p99_ms"),
        "decided_in_window": f"{p['decided_in_window']}/{p['sent_in_window']}",
        "target_p99_ms_max": TARGET_P99_MS,
        "targets_met": {"pipeline_p99": met},
        "all_targets_met": met,
    }


def _brief(p: dict[str, Any]) -> str:
    return (
        f"{p['sent']:,} sent, {p['received']:,} received, {p['out_per_s']:,.0f}/s in the window; "
        f"drain {p['drain']['s']} s ({p['drain']['ended']})"
    )


# --- profiling -------------------------------------------------------------------------------------


class _Profiler:
    """py-spy ``record`` (raw: collapsed stacks) on every service for the pipeline's window."""

    def __init__(self, o: AgentBenchOptions, pids: dict[str, int | None]) -> None:
        assert o.profile_dir is not None
        self.dir = o.profile_dir
        self.o = o
        self.pids = {k: v for k, v in pids.items() if v is not None and k != "mosquitto"}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")

    def start(self) -> None:
        if not Path(self.exe).exists():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            cmd = [self.exe, "record", "--pid", str(pid), "--rate", str(self.o.profile_rate)]
            cmd += ["--format", "raw", "-o", str(self.dir / f"{name}.txt")]
            if self.o.profile_idle:
                cmd.append("--idle")
            cmd += ["--duration", str(max(1, round(self.o.duration_s)))]
            self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def stop(self) -> None:
        for prof in self.procs:
            try:
                prof.wait(max(5.0, self.o.duration_s + 5))
            except subprocess.TimeoutExpired:
                prof.kill()
                prof.wait()

    def summary(self, top: int = 12) -> dict[str, Any]:
        """Per service: samples (CPU only, unless ``profile_idle``: py-spy leaves out threads waiting
        in a call), and the functions with the most samples on the stack (inclusive) and at its top
        (self), as % of them."""
        out: dict[str, Any] = {}
        for name in self.pids:
            path = self.dir / f"{name}.txt"
            if path.is_file():
                out[name] = collapsed_summary(path.read_text(), top)
        return out


def collapsed_summary(text: str, top: int = 12) -> dict[str, Any]:
    """``frame;frame;... count`` lines (py-spy raw) -> samples, top self and inclusive frames."""
    total = 0
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count

    def pct(c: Counter[str], top: int = top) -> list[tuple[str, float]]:
        return [(f, round(100.0 * v / total, 1)) for f, v in c.most_common(top)] if total else []

    return {"samples": total, "self_pct": pct(own), "inclusive_pct": pct(incl, 2 * top)}
