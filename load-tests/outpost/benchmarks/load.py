"""The load generator: valid ingest readings, published by paho from a process of its own.

Two ways to offer load:

* **paced** (``rate > 0``): open loop, message *k* leaves at ``start + k * batch / rate``; for latency,
  where the offered rate must not depend on how fast the system answers.
* **windowed** (``rate == 0``): as fast as the far end takes it, with at most ``window`` readings
  published but not yet seen by the sink. A flat-out publisher without the window would measure how
  fast Mosquitto can buffer (it queues up to ``max_queued_messages`` per client), not how fast the
  subscriber works, and would leave a backlog that keeps the cores busy after the measurement.

Each reading is about 120 bytes of JSON with ``ts = time.time_ns()`` taken just before its message is
published; the devices are used round-robin, each with its own monotonic ``seq``.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from outpost.benchmarks.channels import Channels
from outpost.benchmarks.mqtt import connect, drain, paho_client
from outpost.topics import Topics

# 64 plausible temperatures, formatted once.
_VALUES = [b"%.4f" % (18.0 + (i * 7919 % 1000) / 100.0) for i in range(64)]
_TAIL = b',"metric":"temperature","value":%s,"unit":"C"}'


@dataclass(frozen=True)
class LoadSpec:
    host: str
    port: int
    site: str
    qos: int = 0
    batch: int = 1  # readings per message
    devices: int = 100
    rate: float = 0.0  # readings/s; 0: windowed (as fast as the sink takes it)
    window: int = 5000  # most readings in flight in windowed mode
    client_id: str = "bench-load"
    device_prefix: str = "bench-dev"
    payload_bytes: int = 0  # > 0: one fixed payload of this size instead of readings (client comparison)
    mqtt5: bool = False  # speak MQTT 5 (as the bus does) instead of paho's default 3.1.1


class PayloadSource(Protocol):
    topics: list[str]

    def make(self, device: int, ts: int) -> bytes: ...


class Fixed:
    """One payload of ``size`` bytes to one topic: the client comparison measures the clients, not
    payload building."""

    def __init__(self, topic: str, size: int) -> None:
        self.topics = [topic]
        self._payload = (
            b'{"device":"bench-dev-00001","metric":"temperature","value":21.5,"pad":"' + b"x" * size
        )[: size - 2] + b'"}'

    def make(self, device: int, ts: int) -> bytes:
        del device, ts
        return self._payload


class Payloads:
    """Readings for ``devices`` devices, built with bytes formatting (about 0.5 us a reading, half of
    what building a dict and ``orjson.dumps`` costs), one message at a time."""

    def __init__(self, site: str, devices: int, batch: int, prefix: str = "bench-dev") -> None:
        names = [f"{prefix}-{i:05d}" for i in range(devices)]
        topics = Topics(site=site)
        self.topics = [topics.telemetry(n) for n in names]
        self._heads = [b'{"device":"%s","seq":' % n.encode() for n in names]
        self._seqs = [0] * devices
        self.batch = batch
        self._v = 0

    def _reading(self, head: bytes, seq: int, ts: int) -> bytes:
        self._v = (self._v + 1) & 63
        return head + b'%d,"ts":%d' % (seq, ts) + _TAIL % _VALUES[self._v]

    def make(self, device: int, ts: int) -> bytes:
        """The next message of ``device``: one reading (an object) or a batch (a list)."""
        seq = self._seqs[device]
        self._seqs[device] = seq + self.batch
        head = self._heads[device]
        if self.batch == 1:
            return self._reading(head, seq, ts)
        return b"[" + b",".join([self._reading(head, s, ts) for s in range(seq, seq + self.batch)]) + b"]"


def run_publisher(spec: LoadSpec, ch: Channels) -> None:
    """Process entry point: connect, wait for ``go``, publish until ``stop_pub``, report."""
    result: dict[str, Any] = {"spec": asdict(spec)}
    try:
        result.update(_publish(spec, ch))
    except BaseException:  # the parent reports it: a child's traceback alone is easy to miss
        result["error"] = traceback.format_exc()
        raise
    finally:
        ch.results.put(("load", result))


def _publish(spec: LoadSpec, ch: Channels) -> dict[str, Any]:
    client = paho_client(spec.client_id, mqtt5=spec.mqtt5)
    client.max_inflight_messages_set(min(65000, max(20, spec.window // spec.batch + 100)))
    acked = [0]
    if spec.qos:

        def on_publish(_c: Any, _u: Any, _mid: int, _rc: Any, _p: Any) -> None:
            acked[0] += 1

        client.on_publish = on_publish
    connect(client, spec.host, spec.port)
    ch.pub_ready.set()
    while not ch.go.value:
        if ch.stop_pub.value:
            return {"sent": 0, "msgs": 0}
        client.loop(0.002)
    payloads: PayloadSource
    if spec.payload_bytes:
        payloads = Fixed(Topics(site=spec.site).telemetry(spec.device_prefix), spec.payload_bytes)
    else:
        payloads = Payloads(spec.site, spec.devices, spec.batch, spec.device_prefix)
    t0 = time.perf_counter()
    if spec.rate > 0:
        msgs, nbytes, errors = _paced(client, spec, payloads, ch)
    else:
        msgs, nbytes, errors = _windowed(client, spec, payloads, ch)
    elapsed = time.perf_counter() - t0
    if spec.qos:
        flushed = drain(client, lambda: acked[0] >= msgs - errors, 15.0)
    else:
        flushed = drain(client, lambda: not client.want_write(), 15.0)
    client.disconnect()
    drain(client, lambda: not client.is_connected(), 2.0)
    return {
        "sent": msgs * spec.batch,
        "msgs": msgs,
        "errors": errors,
        "acked": acked[0],
        "flushed": flushed,
        "elapsed_s": elapsed,
        "payload_bytes_mean": nbytes / msgs if msgs else 0.0,
    }


def _windowed(client: Any, spec: LoadSpec, payloads: PayloadSource, ch: Channels) -> tuple[int, int, int]:
    publish, loop, make, topics = client.publish, client.loop, payloads.make, payloads.topics
    received, stop, sent_cell = ch.received, ch.stop_pub, ch.sent
    qos, batch, window, ndev = spec.qos, spec.batch, spec.window, len(topics)
    every = 7 if qos else 63  # loop() reads PUBACKs and pings between publishes
    msgs = nbytes = errors = sent = dev = 0
    while True:
        if window and sent - received.value >= window:
            if stop.value:
                break
            loop(0.0005)
            continue
        payload = make(dev, time.time_ns())
        if publish(topics[dev], payload, qos).rc:
            errors += 1
        dev = dev + 1 if dev + 1 < ndev else 0
        msgs += 1
        nbytes += len(payload)
        sent += batch
        sent_cell.value = sent
        if not msgs & every:
            loop(0.0)
            if stop.value:
                break
    return msgs, nbytes, errors


def _paced(client: Any, spec: LoadSpec, payloads: PayloadSource, ch: Channels) -> tuple[int, int, int]:
    publish, loop, make, topics = client.publish, client.loop, payloads.make, payloads.topics
    stop, sent_cell = ch.stop_pub, ch.sent
    qos, batch, ndev = spec.qos, spec.batch, len(topics)
    interval = batch / spec.rate
    msgs = nbytes = errors = dev = 0
    start = time.perf_counter()
    while not stop.value:
        wait = start + msgs * interval - time.perf_counter()
        if wait > 0:
            loop(min(wait, 0.002))  # sleeps in select() and reads PUBACKs meanwhile
            continue
        payload = make(dev, time.time_ns())
        if publish(topics[dev], payload, qos).rc:
            errors += 1
        dev = dev + 1 if dev + 1 < ndev else 0
        msgs += 1
        nbytes += len(payload)
        sent_cell.value = msgs * batch
        if not msgs & 63:
            loop(0.0)
    return msgs, nbytes, errors
