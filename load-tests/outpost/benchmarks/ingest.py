"""The ingest benchmark: how fast validated events come out of ingest, next to how fast a plain paho
subscriber receives the same load from the same broker, and how long a reading takes to get through.

Scenarios (each a raw phase and an ingest phase with the same load generator settings):

* ``single``: one reading per message (target: ingest >= 50% of the raw rate);
* ``batched``: 100 readings per message (target: >= 100,000 validated readings/s);
* ``batched_qos1``: the same at QoS 1, ingest's default, with confirmed-then-ack cycles;
* ``single_qos1`` (full run only);
* ``latency``: 5,000 readings/s paced, ts at publish -> event at a subscriber, p50/p99, with one
  reading a message and with 10 (QoS 0; the full run adds QoS 1 and the same figure for the plain
  subscriber, i.e. the broker hop alone). A phase whose sink received less than 95% of the offered
  rate is marked ``saturated``: its latency is queueing, not ingest's own.

Throughput phases use the windowed load generator (:mod:`outpost.benchmarks.load`) at QoS 0 unless
named ``_qos1``. Every phase starts fresh processes and a fresh site, so nothing (seq state, sessions,
queues) carries over from one to the next.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from outpost.benchmarks.phase import PhaseSpec, run_phase, workdir
from outpost.broker import Mosquitto

TARGET_RATIO = 0.5
TARGET_BATCHED_PER_S = 100_000.0


@dataclass(frozen=True)
class IngestBenchOptions:
    duration_s: float = 6.0  # measured seconds of each phase
    warmup_s: float = 1.0  # seconds of load before the window opens
    quick: bool = False  # the short run: fewer phases (see plan())
    devices: int = 100  # devices of the one-reading scenarios (each with its own seq)
    batch: int = 100  # readings per message of the batched scenarios
    batched_devices: int = 1000
    latency_rate: float = 5000.0  # readings/s offered in the latency scenario
    profile_dir: Path | None = None  # py-spy ingest during each ingest window (collapsed stacks)

    @classmethod
    def make(cls, *, quick: bool = False, duration_s: float | None = None, **kw: Any) -> IngestBenchOptions:
        """Options for a full run (about 2 minutes on 2 cores) or a quick one (about 20 s)."""
        if duration_s is None:
            duration_s = 1.2 if quick else 6.0
        warmup = kw.pop("warmup_s", 0.4 if quick else 1.0)
        return cls(duration_s=duration_s, warmup_s=warmup, quick=quick, **kw)


Progress = Callable[[str], None]


def plan(o: IngestBenchOptions) -> dict[str, list[PhaseSpec]]:
    """Scenario name -> its phases, in the order they run."""
    base = PhaseSpec(
        name="",
        target="raw",
        warmup_s=o.warmup_s,
        measure_s=o.duration_s,
        profile_dir=o.profile_dir,
        drain_s=0.5 if o.quick else 2.0,  # QoS 0 only; QoS 1 phases wait longer for every message
    )
    one = replace(base, batch=1, devices=o.devices, window=5000)
    many = replace(base, batch=o.batch, devices=o.batched_devices, window=max(5000, 200 * o.batch))
    lat = replace(one, rate=o.latency_rate, window=0, latency=True)
    phases: dict[str, list[PhaseSpec]] = {
        "single": [replace(one, name="single_raw"), replace(one, name="single_ingest", target="ingest")],
        "batched": [replace(many, name="batched_raw"), replace(many, name="batched_ingest", target="ingest")],
        "batched_qos1": [
            replace(many, name="batched_qos1_raw", qos=1, drain_s=15.0),
            replace(many, name="batched_qos1_ingest", target="ingest", qos=1, drain_s=15.0),
        ],
        "latency": [
            replace(lat, name="latency_ingest", target="ingest"),
            replace(lat, name="latency_batch10_ingest", target="ingest", batch=10),
        ],
    }
    if o.quick:
        del phases["batched_qos1"][0]  # the QoS 1 raw baseline is context, not a target
    else:
        phases["single"].insert(1, replace(one, name="single_raw_mqtt5", mqtt5=True))
        phases["single_qos1"] = [
            replace(one, name="single_qos1_raw", qos=1, drain_s=15.0),
            replace(one, name="single_qos1_ingest", target="ingest", qos=1, drain_s=15.0),
        ]
        phases["latency"].insert(0, replace(lat, name="latency_raw"))
        phases["latency"].append(replace(lat, name="latency_qos1_ingest", target="ingest", qos=1))
    return phases


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how busy the machine already was."""
    try:
        proc = subprocess.run(["mosquitto", "-h"], check=False, capture_output=True, text=True, timeout=5)
        m = re.search(r"mosquitto version (\S+)", proc.stdout)
        mosquitto = m.group(1) if m else "?"
    except (OSError, subprocess.SubprocessError):
        mosquitto = "?"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mosquitto": mosquitto,
        "paho_mqtt": importlib.metadata.version("paho-mqtt"),
        "load_avg_1m_before": round(os.getloadavg()[0], 2),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _scenario(name: str, phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    raw = next((p for k, p in phases.items() if k.endswith("_raw")), None)
    ing = next((p for k, p in phases.items() if k.endswith("_ingest")), None)
    out: dict[str, Any] = {"phases": phases}
    if raw is not None and ing is not None and raw["readings_per_s"] > 0:
        out["ratio"] = round(ing["readings_per_s"] / raw["readings_per_s"], 3)
    if name == "single" and "ratio" in out:
        out["target"] = {"ratio": TARGET_RATIO, "met": out["ratio"] >= TARGET_RATIO}
    if name == "batched" and ing is not None:
        rate = ing["readings_per_s"]
        out["target"] = {"readings_per_s": TARGET_BATCHED_PER_S, "met": rate >= TARGET_BATCHED_PER_S}
    return out


def run_ingest_bench(
    options: IngestBenchOptions,
    *,
    progress: Progress | None = None,
    only: set[str] | None = None,
) -> dict[str, Any]:
    """Run the benchmark against a Mosquitto of its own (in a temp dir) and return the figures."""
    say = progress or (lambda _msg: None)
    started = time.monotonic()
    result: dict[str, Any] = {"bench": "ingest", "machine": machine(), "options": _jsonable(asdict(options))}
    scenarios: dict[str, Any] = {}
    with workdir("outpost-bench-") as work, Mosquitto(work / "broker") as broker:
        for name, phases in plan(options).items():
            if only is not None and name not in only:
                continue
            done: dict[str, dict[str, Any]] = {}
            for spec in phases:
                say(f"{spec.name}: {_describe(spec)}")
                done[spec.name] = run_phase(broker, spec, work)
                say(f"{spec.name}: {_brief(done[spec.name])}")
            scenarios[name] = _scenario(name, done)
    result["scenarios"] = scenarios
    result["summary"] = summarize(scenarios)
    result["machine"]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    return result


def summarize(scenarios: dict[str, Any]) -> dict[str, Any]:
    """The headline figures, flat, for the table, the docs and scripts."""

    def rate(scenario: str, phase: str) -> float | None:
        p = scenarios.get(scenario, {}).get("phases", {}).get(phase)
        return None if p is None else float(p["readings_per_s"])

    def lat(phase: str) -> dict[str, Any] | None:
        p = scenarios.get("latency", {}).get("phases", {}).get(phase)
        return None if p is None else dict(p.get("latency", {}))

    s: dict[str, Any] = {
        "raw_per_s": rate("single", "single_raw"),
        "raw_mqtt5_per_s": rate("single", "single_raw_mqtt5"),
        "ingest_per_s": rate("single", "single_ingest"),
        "ratio": scenarios.get("single", {}).get("ratio"),
        "batched_raw_per_s": rate("batched", "batched_raw"),
        "batched_per_s": rate("batched", "batched_ingest"),
        "batched_qos1_raw_per_s": rate("batched_qos1", "batched_qos1_raw"),
        "batched_qos1_per_s": rate("batched_qos1", "batched_qos1_ingest"),
        "single_qos1_raw_per_s": rate("single_qos1", "single_qos1_raw"),
        "single_qos1_per_s": rate("single_qos1", "single_qos1_ingest"),
        "latency_qos0": lat("latency_ingest"),
        "latency_batch10_qos0": lat("latency_batch10_ingest"),
        "latency_qos1": lat("latency_qos1_ingest"),
        "latency_raw": lat("latency_raw"),
    }
    targets = {
        name: sc["target"]["met"] for name, sc in scenarios.items() if isinstance(sc.get("target"), dict)
    }
    s["targets_met"] = targets
    s["all_targets_met"] = bool(targets) and all(targets.values())
    return s


def _describe(spec: PhaseSpec) -> str:
    load = f"{spec.rate:g} readings/s paced" if spec.rate else f"windowed ({spec.window} in flight)"
    proto = " MQTT 5" if spec.mqtt5 else ""
    return f"{spec.target}{proto}, QoS {spec.qos}, {spec.batch}/msg, {spec.devices} devices, {load}"


def _brief(p: dict[str, Any]) -> str:
    text = f"{p['readings_per_s']:,.0f} readings/s ({p['msgs_per_s']:,.0f} msgs/s)"
    if "latency" in p:
        text += f", p50 {p['latency'].get('p50_ms')} ms, p99 {p['latency'].get('p99_ms')} ms"
    cpu = " ".join(f"{k} {v:.0f}%" for k, v in p["cpu_pct"].items())
    return text + f"; CPU {cpu}"


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
