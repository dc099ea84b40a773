"""The far ends of a benchmark: a plain paho subscriber on the raw telemetry, and a subscriber on
ingest's events (plus its dead letters, status and metrics). Each runs in a process of its own.

Both add what they receive to the shared ``received`` counter, which the parent samples to compute
rates and the load generator reads to keep its window. With ``latency`` on they record, for every
reading stamped inside the parent's measurement window, the time from its ``ts`` (taken just before
it was published) to its arrival here.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson

from outpost.benchmarks.channels import Channels, reporting
from outpost.benchmarks.mqtt import connect, paho_client, subscribe
from outpost.contracts import DeadLetter
from outpost.errors import TopicError
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
    topic: str = ""  # the raw sink's subscription; '': the site's telemetry


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


def _run(role: str, spec: Any, ch: Channels, body: Any) -> None:
    with reporting(ch, role, spec) as result:
        result.update(body(spec, ch))


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
    subscribe(client, [(spec.topic or Topics(site=spec.site).all_telemetry, spec.qos)])
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


# --- the overload benchmark's two far ends ----------------------------------------------------------


@dataclass(frozen=True)
class CanarySpec:
    host: str
    port: int
    site: str
    devices: tuple[str, ...]  # the canary devices: only their events are subscribed to
    qos: int = 1
    client_id: str = "bench-canary-sink"


def run_canary_sink(spec: CanarySpec, ch: Channels) -> None:
    """Process entry point: the canaries' events only, so that their latency is not measured behind
    the flood's dead letters in the same process. Counts distinct (device, seq) into ``received``."""
    _run("canary_sink", spec, ch, _canaries)


def _canaries(spec: CanarySpec, ch: Channels) -> dict[str, Any]:
    topics = Topics(site=spec.site)
    client = paho_client(spec.client_id)
    received, lat_from, lat_to = ch.received, ch.lat_from, ch.lat_to
    hist = Histogram()
    seen: set[tuple[str, int]] = set()
    duplicates = [0]

    def on_events(_c: Any, _u: Any, msg: Any) -> None:
        now = time.time_ns()
        lo, hi = lat_from.value, lat_to.value
        for event in orjson.loads(msg.payload):
            key = (event["device"], event["seq"])
            if key in seen:
                duplicates[0] += 1
                continue
            seen.add(key)
            ts = event["ts"]
            if lo and ts >= lo and (not hi or ts < hi):
                hist.record_ns(now - ts)
        received.value = len(seen)

    client.on_message = on_events
    connect(client, spec.host, spec.port)
    subscribe(client, [(topics.events(d), spec.qos) for d in spec.devices])
    ch.sink_ready.set()
    _loop_until_stopped(client, ch)
    client.disconnect()
    return {"delivered": len(seen), "duplicates": duplicates[0], "latency": latency_summary(hist)}


def dead_letter_items(doc: dict[str, Any], per_msg: int) -> int:
    """How many of a device's readings one dead letter accounts for, by the dead-letter contract
    (:class:`outpost.contracts.DeadLetter`): ``count`` inputs (1 when absent or not a count), each one
    item of a batch where the entry names items (``index`` for one, ``items`` for a group) and else a
    whole message (refused whole, or shed unread): ``per_msg`` readings."""
    count = doc.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        count = 1
    return count if doc.get("index") is not None or doc.get("items") else count * per_msg


def shed_counted(counters: dict[str, int]) -> tuple[int, dict[str, int]]:
    """Messages a service says it shed: its counters named ``shed``, ``shed.*`` or ``shed_*`` (the
    total ``shed`` when there is one, else the sum of the others), and those counters. Shown beside
    the accounting, not added to it: every shed message is also in an aggregate dead letter's
    ``count``."""
    shed = {k: v for k, v in counters.items() if k == "shed" or k.startswith(("shed.", "shed_"))}
    return (shed["shed"] if "shed" in shed else sum(shed.values())), shed


@dataclass(frozen=True)
class AccountSpec:
    host: str
    port: int
    site: str
    services: tuple[str, ...]  # whose status and metrics to follow
    canary_prefix: str
    load_device: str = ""  # the flooding or bad-batch device ('' in the baseline)
    load_per_msg: int = 1  # its readings per message: a whole-message dead letter stands for them all
    client_id: str = "bench-account-sink"


def run_account_sink(spec: AccountSpec, ch: Channels) -> None:
    """Process entry point: every event, dead letter, metrics batch and service status of the site,
    split by device (canaries, the load device, others), so that what the load device sent can be
    accounted for. ``received`` = the load device's distinct events + its dead-lettered items +
    what ingest counts as shed;
    ``service_ready`` is set once every service said it is online."""
    _run("account_sink", spec, ch, _account)


def _account(spec: AccountSpec, ch: Channels) -> dict[str, Any]:
    topics = Topics(site=spec.site)
    client = paho_client(spec.client_id)
    known_fields = set(DeadLetter.model_fields)
    new_fields: set[str] = set()
    classes = ("canary", "load", "other")
    seen: dict[str, set[tuple[str, int]]] = {c: set() for c in classes}
    dl_keys: set[int] = set()
    acc = {c: Counter[str]() for c in classes}
    reasons = {c: Counter[str]() for c in classes}
    stages: Counter[str] = Counter()
    stage_inputs: Counter[str] = Counter()  # the inputs they stand for (the sum of ``count``)
    metrics: dict[str, dict[str, int]] = {}
    batches: Counter[str] = Counter()
    status: dict[str, Counter[str]] = {s: Counter() for s in spec.services}
    last_status: dict[str, dict[str, Any]] = {}
    online: set[str] = set()
    broker: dict[str, int] = {}
    canary = spec.canary_prefix + "-"
    received = ch.received

    def kind(device: str) -> str:
        if device == spec.load_device:
            return "load"
        return "canary" if device.startswith(canary) else "other"

    def publish_progress() -> None:
        shed = shed_counted(metrics.get("ingest", {}))[0]
        received.value = len(seen["load"]) + acc["load"]["dead_lettered"] + shed

    def on_events(_c: Any, _u: Any, msg: Any) -> None:
        for event in orjson.loads(msg.payload):
            c = kind(event["device"])
            key = (event["device"], event["seq"])
            if key in seen[c]:
                acc[c]["event_duplicates"] += 1
            else:
                seen[c].add(key)
        publish_progress()

    def on_dlq(_c: Any, _u: Any, msg: Any) -> None:
        doc = orjson.loads(msg.payload)
        new_fields.update(set(doc) - known_fields)
        stages[str(doc.get("stage"))] += 1
        count = doc.get("count", 1)
        stage_inputs[str(doc.get("stage"))] += count if isinstance(count, int) else 1
        try:
            c = kind(topics.device_of(str(doc.get("topic", ""))))
        except TopicError:
            c = "other"
        # a dead letter published twice gets a new id: the rest of it identifies the input
        key = hash(tuple(str(doc.get(k)) for k in ("reason", "topic", "index", "payload_b64", "detail")))
        if key in dl_keys:
            acc[c]["dead_letter_duplicates"] += 1
            return
        dl_keys.add(key)
        n = dead_letter_items(doc, spec.load_per_msg if c == "load" else 1)
        acc[c]["dead_letters"] += 1
        acc[c]["dead_lettered"] += n
        reasons[c][str(doc.get("reason"))] += n
        publish_progress()

    def on_metrics(_c: Any, _u: Any, msg: Any) -> None:
        doc = orjson.loads(msg.payload)
        service = str(doc.get("service"))
        metrics[service] = dict(doc.get("counters", {}))
        batches[service] += 1
        publish_progress()

    def on_status(_c: Any, _u: Any, msg: Any) -> None:
        if not msg.payload:
            return
        doc = orjson.loads(msg.payload)
        service, state = str(doc.get("service")), str(doc.get("state"))
        status.setdefault(service, Counter())[state] += 1
        last_status[service] = {k: doc.get(k) for k in ("state", "health", "problems", "reason")}
        if state == "online":
            online.add(service)
            if online >= set(spec.services):
                ch.service_ready.set()

    def on_sys(_c: Any, _u: Any, msg: Any) -> None:
        with contextlib.suppress(ValueError):
            broker[msg.topic.rsplit("/", 1)[-1]] = int(msg.payload)

    client.message_callback_add(topics.all_events, on_events)
    client.message_callback_add(topics.all_dlq, on_dlq)
    client.message_callback_add(topics.all_metrics, on_metrics)
    for s in spec.services:
        client.message_callback_add(topics.service_status(s), on_status)
    client.message_callback_add("$SYS/broker/publish/messages/dropped", on_sys)
    connect(client, spec.host, spec.port)
    subscribe(
        client,
        [
            (topics.all_events, 1),
            (topics.all_dlq, 1),
            (topics.all_metrics, 0),
            *((topics.service_status(s), 1) for s in spec.services),
            ("$SYS/broker/publish/messages/dropped", 0),
        ],
    )
    ch.sink_ready.set()
    _loop_until_stopped(client, ch)
    # what the broker already sent (the services' last statuses and metrics, behind a backlog of dead
    # letters) is still read: until 0.5 s pass with nothing new, 10 s at most
    quiet_until, deadline = time.monotonic() + 0.5, time.monotonic() + 10.0
    while time.monotonic() < min(quiet_until, deadline):
        before = sum(batches.values()) + len(dl_keys) + sum(len(v) for v in seen.values())
        client.loop(0.05)
        if sum(batches.values()) + len(dl_keys) + sum(len(v) for v in seen.values()) != before:
            quiet_until = time.monotonic() + 0.5
    client.disconnect()
    out: dict[str, Any] = {
        c: {
            "events": len(seen[c]),
            **{k: acc[c][k] for k in ("event_duplicates", "dead_letters", "dead_lettered")},
            "dead_letter_duplicates": acc[c]["dead_letter_duplicates"],
            "dead_lettered_by_reason": dict(reasons[c]),
        }
        for c in classes
    }
    out.update(
        dead_letters_by_stage=dict(stages),
        dead_lettered_by_stage=dict(stage_inputs),
        dead_letter_fields_new=sorted(new_fields),
        metrics=metrics,
        metrics_batches=dict(batches),
        status={s: dict(n) for s, n in status.items()},
        last_status=last_status,
        broker_dropped=broker.get("dropped"),
    )
    return out
