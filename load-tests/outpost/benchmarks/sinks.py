"""The far ends of a benchmark: a plain paho subscriber on the raw telemetry, and a subscriber on
ingest's events (plus its dead letters, status and metrics). Each runs in a process of its own.

Both add what they receive to the shared ``received`` counter, which the parent samples to compute
rates and the load generator reads to keep its window. With ``latency`` on they record, for every
reading stamped inside the parent's measurement window, the time from its ``ts`` (taken just before
it was published) to its arrival here.
"""

from __future__ import annotations

import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from outpost.benchmarks.channels import Channels
from outpost.benchmarks.mqtt import connect, paho_client, subscribe
from outpost.metrics import Histogram
from outpost.topics import Topics


@dataclass(frozen=True)
class SinkSpec:
    host: str
    port: int
    site: str
    qos: int = 0
    batch: int = 1  # readings per raw message (the raw sink counts, it does not parse)
    latency: bool = False
    mqtt5: bool = False  # the raw sink speaks MQTT 5, like the bus, instead of paho's default 3.1.1
    client_id: str = "bench-sink"
    service: str = "ingest"


def latency_summary(h: Histogram) -> dict[str, float]:
    """count, p50/p90/p99/p99.9 and max in milliseconds."""
    out = h.summary()
    out["p90_ms"] = round(h.percentile_ms(90), 3)
    out["p999_ms"] = round(h.percentile_ms(99.9), 3)
    return out


def run_raw_sink(spec: SinkSpec, ch: Channels) -> None:
    """Process entry point: the plain paho subscriber, the baseline ingest is compared with."""
    _run("sink", spec, ch, _raw)


def run_event_sink(spec: SinkSpec, ch: Channels) -> None:
    """Process entry point: counts the readings inside ingest's event lists, and dead letters."""
    _run("sink", spec, ch, _events)


def _run(role: str, spec: SinkSpec, ch: Channels, body: Any) -> None:
    result: dict[str, Any] = {"spec": asdict(spec)}
    try:
        result.update(body(spec, ch))
    except BaseException:  # the parent reports it: a child's traceback alone is easy to miss
        result["error"] = traceback.format_exc()
        raise
    finally:
        ch.results.put((role, result))


def _loop_until_stopped(client: Any, ch: Channels) -> None:
    loop, stop = client.loop, ch.stop_sink
    while not stop.value:
        loop(0.05)


def _raw(spec: SinkSpec, ch: Channels) -> dict[str, Any]:
    client = paho_client(spec.client_id, mqtt5=spec.mqtt5)
    received, lat_from, lat_to = ch.received, ch.lat_from, ch.lat_to
    per_msg = spec.batch
    hist = Histogram()
    msgs = [0]

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        msgs[0] += 1
        received.value += per_msg

    def on_message_latency(_c: Any, _u: Any, msg: Any) -> None:
        now = time.time_ns()
        msgs[0] += 1
        received.value += per_msg
        doc = orjson.loads(msg.payload)
        ts = doc["ts"] if isinstance(doc, dict) else doc[0]["ts"]
        lo, hi = lat_from.value, lat_to.value
        if lo and ts >= lo and (not hi or ts < hi):
            hist.record_ns(now - ts)

    client.on_message = on_message_latency if spec.latency else on_message
    connect(client, spec.host, spec.port)
    subscribe(client, [(Topics(site=spec.site).all_telemetry, spec.qos)])
    ch.sink_ready.set()
    _loop_until_stopped(client, ch)
    client.disconnect()
    out: dict[str, Any] = {"msgs": msgs[0], "readings": msgs[0] * per_msg}
    if spec.latency:
        out["latency"] = latency_summary(hist)
    return out


def _events(spec: SinkSpec, ch: Channels) -> dict[str, Any]:
    topics = Topics(site=spec.site)
    client = paho_client(spec.client_id)
    received, lat_from, lat_to = ch.received, ch.lat_from, ch.lat_to
    hist = Histogram()
    counts = {"msgs": 0, "readings": 0, "dlq": 0}
    reasons: Counter[str] = Counter()
    service_metrics: dict[str, Any] = {}
    latency = spec.latency

    def on_events(_c: Any, _u: Any, msg: Any) -> None:
        now = time.time_ns()
        doc = orjson.loads(msg.payload)
        n = len(doc)
        counts["msgs"] += 1
        counts["readings"] += n
        received.value += n
        if latency:
            lo, hi = lat_from.value, lat_to.value
            if lo:
                for event in doc:
                    ts = event["ts"]
                    if ts >= lo and (not hi or ts < hi):
                        hist.record_ns(now - ts)

    def on_dlq(_c: Any, _u: Any, msg: Any) -> None:
        counts["dlq"] += 1
        received.value += 1
        reasons[str(orjson.loads(msg.payload).get("reason"))] += 1

    def on_metrics(_c: Any, _u: Any, msg: Any) -> None:
        doc = orjson.loads(msg.payload)
        service_metrics.update(counters=doc.get("counters", {}), histograms=doc.get("histograms", {}))

    def on_status(_c: Any, _u: Any, msg: Any) -> None:
        if orjson.loads(msg.payload).get("state") == "online":
            ch.service_ready.set()

    client.message_callback_add(topics.all_events, on_events)
    client.message_callback_add(topics.all_dlq, on_dlq)
    client.message_callback_add(topics.service_status(spec.service), on_status)
    client.message_callback_add(topics.metrics(spec.service), on_metrics)
    connect(client, spec.host, spec.port)
    subscribe(
        client,
        [
            (topics.all_events, spec.qos),
            (topics.all_dlq, 1),
            (topics.service_status(spec.service), 1),
            (topics.metrics(spec.service), 0),
        ],
    )
    ch.sink_ready.set()
    _loop_until_stopped(client, ch)
    client.disconnect()
    out: dict[str, Any] = {**counts, "dlq_reasons": dict(reasons), "service_metrics": service_metrics}
    if latency:
        out["latency"] = latency_summary(hist)
    return out
