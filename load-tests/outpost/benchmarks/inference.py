"""The inference benchmark: raw ``session.run`` next to the service through the bus, in one run.

* **raw**: the backend the service would build (same factory, same settings) on the same model,
  called directly at batch 1, 32 and 256: per-call p50/p99 and rows/s;
* **latency**: a separate process publishes single-event messages (QoS 1, like ingest) at a fixed
  rate (5,000 events/s) to the service; a sink measures event-to-score latency (the score arrives
  minus the event's ``ts``, stamped just before publishing), p50/p99;
* **saturation**: events offered faster than the service can score, in messages of 50, so batches
  fill to ``max_batch``; the service's own counters give its per-row compute, compared with the
  raw per-row figure at the same batch size (target: within 1.3x).

Everything runs against a Mosquitto the benchmark starts itself, with the service as its own
process (``python -m outpost.services.inference``), exactly as ``outpost up`` runs it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from outpost.benchmarks.mqtt import connect, paho_client, subscribe
from outpost.broker import Mosquitto
from outpost.metrics import Histogram

TARGET_COMPUTE_RATIO = 1.3
TARGET_P99_MS = 20.0
MODEL = "shelf-stock"


@dataclass(frozen=True)
class InferenceBenchOptions:
    backend: str = "onnxruntime"  # onnxruntime | tensorrt | auto
    quick: bool = False
    rate: float = 5000.0  # events/s offered in the latency phase
    duration_s: float = 8.0  # measured seconds of each service phase
    warmup_s: float = 2.0
    devices: int = 100
    raw_calls: int = 2000
    max_batch: int = 256  # the service's inference.max_batch in the service phases (its default)

    @classmethod
    def make(cls, *, quick: bool = False, **kw: Any) -> InferenceBenchOptions:
        if quick:
            kw.setdefault("duration_s", 3.0)
            kw.setdefault("warmup_s", 1.0)
            kw.setdefault("raw_calls", 500)
        return cls(quick=quick, **kw)


Progress = Callable[[str], None]


def _backend_config(name: str) -> Any:
    from outpost.services.inference.backends.config import AutoConfig, OrtConfig, TensorRTConfig

    return {"onnxruntime": OrtConfig, "tensorrt": TensorRTConfig, "auto": AutoConfig}[name]()


def raw_phase(o: InferenceBenchOptions, engine_dir: Path) -> dict[str, Any]:
    """session.run on the model, as the service would build it, at batch 1, 32, 256."""
    from outpost.services.inference.backends.factory import build_backend
    from outpost.services.inference.manifest import read_manifest, verify
    from outpost.services.inference.registry import PACKAGED_MODELS

    folder = max((PACKAGED_MODELS / MODEL).iterdir(), key=lambda p: p.name)
    manifest = read_manifest(folder)
    path = verify(folder, manifest)
    backend = build_backend(
        _backend_config(o.backend), path, model_sha256=manifest.sha256, engine_dir=engine_dir
    )
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"backend": backend.name, "model": manifest.ref, "batches": {}}
    try:
        for batch in sorted({1, 32, 256, o.max_batch}):
            x = rng.standard_normal((batch, len(manifest.features))).astype(np.float32)
            for _ in range(50):
                backend.run(x)
            calls = max(50, o.raw_calls // max(1, min(16, batch // 8)))
            times = []
            for _ in range(calls):
                t = time.perf_counter_ns()
                backend.run(x)
                times.append(time.perf_counter_ns() - t)
            times.sort()
            p50 = statistics.median(times) / 1e3
            out["batches"][str(batch)] = {
                "calls": calls,
                "p50_us": round(p50, 2),
                "p99_us": round(times[int(0.99 * (len(times) - 1))] / 1e3, 2),
                "per_row_us": round(p50 / batch, 3),
                "rows_per_s": round(batch / (p50 / 1e6)),
            }
        # The same calls with the caches evicted in between (32 MB touched before each), as the
        # service's own work between batches (parsing, MQTT, features) evicts them: what a call
        # costs when it does not find the model and the runtime's code in cache.
        b = o.max_batch
        x = rng.standard_normal((b, len(manifest.features))).astype(np.float32)
        junk = np.zeros(4_000_000)
        cold = []
        for _ in range(max(50, o.raw_calls // 16)):
            junk += 1.0
            t = time.thread_time_ns()
            backend.run(x)
            cold.append(time.thread_time_ns() - t)
        out["cold"] = {
            "batch": b,
            "p50_us": round(statistics.median(cold) / 1e3, 2),
            "per_row_us": round(statistics.median(cold) / 1e3 / b, 3),
        }
    finally:
        backend.close()
    return out


def _publisher(
    port: int,
    site: str,
    rate: float,
    per_msg: int,
    devices: int,
    seconds: float,
    start_seq: int,
    done: Any,
    ready: Any,
) -> None:
    """Open-loop paced publisher (its own process): message k leaves at start + k / msg_rate.
    ``ready`` is set when it is connected and its clock starts (spawning it takes a second or more
    on a loaded machine: the warm-up must not start before it does)."""
    c = paho_client(f"bench-pub-{os.getpid()}")
    c.max_inflight_messages_set(0)
    connect(c, "127.0.0.1", port)
    ready.set()
    root = f"outpost/v1/{site}/events/"
    msg_rate = rate / per_msg
    seq = start_seq
    k = 0
    t0 = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
        due = int(elapsed * msg_rate) + 1
        while k < due:
            d = f"shelf-{k % devices:04d}"
            now = time.time_ns()
            evs = []
            for _ in range(per_msg):
                eid = f"{d}-{seq}"
                evs.append(
                    {
                        "v": 1,
                        "id": eid,
                        "ts": now,
                        "trace": eid,
                        "device": d,
                        "seq": seq,
                        "metric": "shelf_weight",
                        "value": 5.0 + (seq % 37) * 0.3,
                        "unit": "kg",
                        "ingest_ns": now,
                        "gap": 0,
                        "late": False,
                    }
                )
                seq += 1
            c.publish(root + d, orjson.dumps(evs), qos=1)
            k += 1
        c.loop(0.0005)
    end = time.monotonic() + 5
    while c.want_write() and time.monotonic() < end:
        c.loop(0.01)
    for _ in range(50):
        c.loop(0.01)
    c.disconnect()
    done.set()


class _Sink:
    """Counts scores and records event-to-score latency for scores stamped inside the window."""

    def __init__(self, port: int, site: str) -> None:
        self.c = paho_client(f"bench-sink-{os.getpid()}")
        self.hist = Histogram()
        self.window: tuple[int, int] = (0, 0)
        self.in_window = 0
        self.total = 0
        self.arrived = 0
        self.metrics: list[dict[str, Any]] = []
        self.c.on_message = self._on
        connect(self.c, "127.0.0.1", port)
        subscribe(
            self.c, [(f"outpost/v1/{site}/inference/+/+", 0), (f"outpost/v1/{site}/metrics/inference", 0)]
        )
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.c.loop(0.01)

    def _on(self, _c: Any, _u: Any, msg: Any) -> None:
        now = time.time_ns()
        doc = orjson.loads(msg.payload)
        if isinstance(doc, dict):
            self.metrics.append(doc)
            return
        lo, hi = self.window
        self.arrived += len(doc)
        for s in doc:
            self.total += 1
            ts = s["ts"]
            if lo <= ts < hi:
                self.in_window += 1
                self.hist.record_ns(now - ts)

    def counters(self) -> dict[str, int]:
        return dict(self.metrics[-1]["counters"]) if self.metrics else {}

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.c.disconnect()


def _service(port: int, site: str, data: Path, backend: str, max_batch: int) -> subprocess.Popen[bytes]:
    data.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OUTPOST_SITE": site,
        "OUTPOST_DATA_DIR": str(data),
        "OUTPOST_MQTT__PORT": str(port),
        "OUTPOST_INFERENCE__BACKEND__TYPE": backend,
        "OUTPOST_INFERENCE__MODELS": f'["{MODEL}"]',
        "OUTPOST_INFERENCE__MAX_BATCH": str(max_batch),
        "OUTPOST_TELEMETRY__METRICS_INTERVAL_S": "0.5",
        "OUTPOST_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "outpost.services.inference"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(data / "inference.log").open("wb"),
    )


def service_phase(
    o: InferenceBenchOptions, broker: Mosquitto, data: Path, *, name: str, rate: float, per_msg: int
) -> dict[str, Any]:
    site = f"bench{name}{os.getpid()}"
    proc = _service(broker.port, site, data / name, o.backend, o.max_batch)
    sink = _Sink(broker.port, site)
    try:
        deadline = time.monotonic() + 60
        while not sink.metrics:  # metrics flow once the model is loaded and the bus is up
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"inference service did not start: {(data / name / 'inference.log').read_text()[-2000:]}"
                )
            time.sleep(0.1)
        ctx = mp.get_context("spawn")
        done, ready = ctx.Event(), ctx.Event()
        seconds = o.warmup_s + o.duration_s
        p = ctx.Process(
            target=_publisher, args=(broker.port, site, rate, per_msg, o.devices, seconds, 0, done, ready)
        )
        p.start()
        if not ready.wait(60):
            raise RuntimeError("the bench publisher did not connect within 60 s")
        time.sleep(o.warmup_s)
        arrived0 = sink.arrived
        start = time.time_ns()
        sink.window = (start, start + int(o.duration_s * 1e9))
        time.sleep(o.duration_s)
        arrived = sink.arrived - arrived0
        p.join(30)
        # scores of events stamped in the window that arrive up to a second after it still count
        # as delivered (late, and their latency says so); counted at the window's close they were
        # lost to a service a second behind
        time.sleep(1.0)
        after_window = sink.in_window
        # SIGTERM: the service drains and publishes its final metrics, which the sink still hears
        proc.terminate()
        proc.wait(30)
        time.sleep(0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
        sink.stop()
    # The service's own totals over the whole phase (warm-up and tail included): per-row compute
    # and batch size are averages over every batch it scored, so they need no window of their own.
    after = sink.counters()
    rows = after.get("rows", 0)
    batches = after.get("batches", 0)
    compute = after.get("compute_ns", 0)
    compute_cpu = after.get("compute_cpu_ns", 0)
    offered = rate * o.duration_s
    h = sink.hist.summary()
    return {
        "offered_per_s": rate,
        "events_per_msg": per_msg,
        "scored_per_s": round(arrived / o.duration_s),
        "stamped_in_window_delivered": after_window,
        "delivered_ratio": round(after_window / offered, 4) if offered else 0.0,
        "saturated": after_window < 0.95 * offered,
        "p50_ms": h["p50_ms"],
        "p99_ms": h["p99_ms"],
        "max_ms": h["max_ms"],
        "rows": rows,
        "batches": batches,
        "avg_batch": round(rows / batches, 2) if batches else 0.0,
        "per_row_compute_us": round(compute / rows / 1e3, 3) if rows else 0.0,
        "per_row_compute_cpu_us": round(compute_cpu / rows / 1e3, 3) if rows else 0.0,
        "rejected": after.get("rejected", 0),
        "service_totals": {k: after.get(k, 0) for k in ("events", "scored", "full_batches", "duplicates")},
        "service_histograms": sink.metrics[-1].get("histograms", {}) if sink.metrics else {},
    }


def run_inference_bench(o: InferenceBenchOptions, progress: Progress = lambda _: None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="outpost-bench-inf-") as tmp:
        tmp_path = Path(tmp)
        progress(f"raw session.run on {o.backend}")
        raw = raw_phase(o, tmp_path / "engines")
        broker = Mosquitto(tmp_path / "broker").start()
        try:
            progress(f"latency: {o.rate:,.0f} events/s offered, 10 a message")
            latency = service_phase(o, broker, tmp_path, name="latency", rate=o.rate, per_msg=10)
            progress(f"latency: {o.rate:,.0f} events/s offered, 1 a message")
            latency1 = service_phase(o, broker, tmp_path, name="latency1", rate=o.rate, per_msg=1)
            sat_rate = 40_000.0 if raw["backend"].startswith("tensorrt") else 30_000.0
            progress(f"saturation: {sat_rate:,.0f} events/s offered, 50 a message")
            saturation = service_phase(o, broker, tmp_path, name="saturation", rate=sat_rate, per_msg=50)
        finally:
            broker.stop()
    # the service's batches fill to max_batch when saturated: compare with raw at that batch size
    raw_same = raw["batches"][str(o.max_batch)]["per_row_us"]
    ratio = round(saturation["per_row_compute_cpu_us"] / raw_same, 3) if raw_same else 0.0
    ratio_wall = round(saturation["per_row_compute_us"] / raw_same, 3) if raw_same else 0.0
    return {
        "bench": "inference",
        "backend": raw["backend"],
        "model": raw["model"],
        "raw": raw["batches"],
        "latency": latency,
        "latency_single": latency1,
        "saturation": saturation,
        "compute_batch": o.max_batch,
        "compute_ratio_vs_raw": ratio,
        "compute_wall_ratio_vs_raw": ratio_wall,
        "raw_cold_cache": raw["cold"],
        "compute_ratio_vs_raw_cold_cache": round(
            saturation["per_row_compute_cpu_us"] / raw["cold"]["per_row_us"], 3
        )
        if raw["cold"]["per_row_us"]
        else 0.0,
        "targets": {
            "compute_ratio_max": TARGET_COMPUTE_RATIO,
            "compute_ratio_met": o.max_batch >= 32
            and saturation["avg_batch"] >= 0.95 * o.max_batch
            and ratio <= TARGET_COMPUTE_RATIO,
            "p99_ms_max": TARGET_P99_MS,
            "p99_met": latency["p99_ms"] < TARGET_P99_MS and not latency["saturated"],
        },
        "options": {
            "quick": o.quick,
            "duration_s": o.duration_s,
            "rate": o.rate,
            "devices": o.devices,
            "max_batch": o.max_batch,
        },
        "cpus": os.cpu_count(),
    }
