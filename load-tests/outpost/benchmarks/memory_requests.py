"""Heavy memory requests beside the log (issue 14): does a burst of heavy requests slow the log?

A real Mosquitto and the memory service as its own process (``python -m outpost.services.memory``,
as ``outpost up`` runs it). Events are published at a steady rate throughout; after a quiet
baseline one client sends a burst of ``embed`` requests (by default five of 64 texts of 3,000
characters, 256 KB under the request limit), while a second client asks a light ``context-get``
every 0.2 s. Measured:

* the log's lag: for every event, the time from its publish to its log entry's commit (the
  entry's ``at`` minus the event's ``ts``), p50 / p99 / max, for events published before, during
  and after the burst;
* each heavy request's outcome and the burst's duration (first sent to last answered);
* the light client's answer latency during the burst (fairness between clients);
* duplicates in the log and memory's reconnections (a missed keepalive drops it).

``--pythonpath`` runs the memory service from another checkout (the figures "before" a change).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from outpost.broker import Mosquitto
from outpost.bus import Bus, Message
from outpost.services.memory.client import MemoryClient, MemoryRequestError, MemoryTimeout
from outpost.services.memory.oplog import OpLog
from outpost.services.registry import OutpostSettings
from outpost.settings import BrokerSettings

TEXT = ("the chiller on aisle four reported a door left open for several minutes " * 45)[:3000]


def _event(seq: int) -> bytes:
    now = time.time_ns()
    return orjson.dumps(
        [
            {
                "v": 1,
                "id": f"bench-{seq}",
                "ts": now,
                "trace": f"bench-{seq}",
                "device": "bench",
                "seq": seq,
                "metric": "temperature",
                "value": 4.0,
                "unit": "C",
            }
        ]
    )


def _stats_ms(values_ns: list[int]) -> dict[str, float]:
    if not values_ns:
        return {"n": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    v = sorted(values_ns)

    def pick(q: float) -> float:
        return round(v[min(len(v) - 1, int(q * len(v)))] / 1e6, 1)

    return {"n": len(v), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": round(v[-1] / 1e6, 1)}


def run_bench(
    *,
    heavy: int = 5,
    texts: int = 64,
    chars: int = 3000,
    rate: float = 100.0,
    baseline_s: float = 3.0,
    pythonpath: str = "",
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="outpost-memreq-") as tmp:
        root = Path(tmp)
        broker = Mosquitto(root / "broker", BrokerSettings()).start()
        settings = OutpostSettings(site="bench", data_dir=root / "data")
        settings.mqtt.port = broker.port
        env = {
            **os.environ,
            "OUTPOST_SITE": "bench",
            "OUTPOST_DATA_DIR": str(root / "data"),
            "OUTPOST_MQTT__PORT": str(broker.port),
            "OUTPOST_TELEMETRY__METRICS_INTERVAL_S": "1",
        }
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        t = settings.topics
        metrics: list[dict[str, Any]] = []
        online = threading.Event()

        def on_status(msg: Message) -> None:
            if orjson.loads(msg.payload).get("state") == "online":
                online.set()

        watch = Bus(settings.mqtt, client_id="bench-watch")
        watch.subscribe(t.service_status("memory"), on_status, qos=1)
        watch.subscribe(t.metrics("memory"), lambda m: metrics.append(orjson.loads(m.payload)), qos=0)
        watch.start()
        proc = subprocess.Popen(
            [sys.executable, "-m", "outpost.services.memory"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            if not online.wait(120):
                raise RuntimeError("memory never came online")
            return _measure(settings, heavy, texts, chars, rate, baseline_s, metrics)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            watch.stop()
            broker.stop()


def _measure(
    settings: OutpostSettings,
    heavy: int,
    texts: int,
    chars: int,
    rate: float,
    baseline_s: float,
    metrics: list[dict[str, Any]],
) -> dict[str, Any]:
    t = settings.topics
    pub = Bus(settings.mqtt, client_id="bench-events")
    pub.start()
    sent: dict[int, int] = {}  # seq -> publish time (ns)
    stop = threading.Event()

    def publish_events() -> None:
        seq = 0
        interval = 1.0 / rate
        next_at = time.monotonic()
        while not stop.is_set():
            sent[seq] = time.time_ns()
            pub.publish(t.events("bench"), _event(seq), qos=1)
            seq += 1
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    events = threading.Thread(target=publish_events, daemon=True)
    events.start()
    time.sleep(baseline_s)
    outcomes: list[str] = []
    light_ms: list[float] = []
    burst_start = time.time_ns()
    body = {"texts": [TEXT[:chars]] * texts}
    with MemoryClient(settings, "heavy") as mem, MemoryClient(settings, "light") as light:

        def one() -> None:
            try:
                mem.request("embed", body, timeout_s=300)
                outcomes.append("ok")
            except MemoryRequestError as exc:
                outcomes.append(exc.reason)
            except MemoryTimeout:
                outcomes.append("timeout")

        with ThreadPoolExecutor(heavy) as pool:
            futures = [pool.submit(one) for _ in range(heavy)]
            while not all(f.done() for f in futures):
                start = time.perf_counter()
                with contextlib.suppress(MemoryTimeout, MemoryRequestError):
                    light.request("context-get", {"scope": "s", "key": "k"}, timeout_s=120)
                light_ms.append((time.perf_counter() - start) * 1000.0)
                time.sleep(0.2)
    burst_end = time.time_ns()
    time.sleep(baseline_s)
    stop.set()
    events.join()
    total = len(sent)
    log = OpLog(Path(settings.data_dir) / "memory" / "oplog.db", synchronous="NORMAL")
    deadline = time.monotonic() + 300
    distinct = "SELECT count(DISTINCT trace) FROM log WHERE kind = 'event'"
    while time.monotonic() < deadline and log.db.execute(distinct).fetchone()[0] < total:
        time.sleep(0.2)
    entries = log.replay(kind="event", limit=10**7)
    log.close()
    pub.stop()
    committed: dict[str, int] = {}
    duplicates = 0
    for e in entries:
        if e.trace in committed:
            duplicates += 1
        else:
            committed[e.trace] = e.at
    base_lag: list[int] = []
    burst_lag: list[int] = []
    after_lag: list[int] = []
    for seq, ts in sent.items():
        at = committed.get(f"bench-{seq}")
        if at is None:
            continue
        window = base_lag if ts < burst_start else burst_lag if ts <= burst_end else after_lag
        window.append(at - ts)
    counters = metrics[-1]["counters"] if metrics else {}
    return {
        "heavy": {"requests": heavy, "texts": texts, "chars": chars, "outcomes": sorted(outcomes)},
        "burst_s": round((burst_end - burst_start) / 1e9, 2),
        "events": {"sent": total, "logged": len(committed), "duplicates": duplicates, "rate": rate},
        "lag_baseline": _stats_ms(base_lag),
        "lag_burst": _stats_ms(burst_lag),
        "lag_after": _stats_ms(after_lag),
        "light_request_ms": {
            "n": len(light_ms),
            "max": round(max(light_ms, default=0.0), 1),
            "p50": round(sorted(light_ms)[len(light_ms) // 2], 1) if light_ms else 0.0,
        },
        "memory_reconnects": max(0, int(counters.get("bus_connects", 1)) - 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--heavy", type=int, default=5, help="heavy embed requests in the burst")
    p.add_argument("--texts", type=int, default=64, help="texts per embed")
    p.add_argument("--chars", type=int, default=3000, help="characters per text")
    p.add_argument("--rate", type=float, default=100.0, help="events per second throughout")
    p.add_argument("--pythonpath", default="", help="run memory from another checkout's folders")
    p.add_argument("--json", action="store_true", help="one JSON object on the last line")
    a = p.parse_args(argv)
    result = run_bench(heavy=a.heavy, texts=a.texts, chars=a.chars, rate=a.rate, pythonpath=a.pythonpath)
    if a.json:
        print(orjson.dumps(result).decode())
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")
