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

import contextlib
import socket
import time
from dataclasses import dataclass
from typing import Any, Protocol

from outpost.benchmarks.channels import Channels, reporting
from outpost.benchmarks.mqtt import connect, drain, paho_client
from outpost.errors import BrokerError
from outpost.topics import Topics

# 64 plausible temperatures, formatted once.
_VALUES = [b"%.4f" % (18.0 + (i * 7919 % 1000) / 100.0) for i in range(64)]
_TAIL = b',"metric":"%s","value":%%s,"unit":"%s"}'


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
    limit: int = 0  # > 0: stop after this many messages (a flood of a given size)
    junk_bytes: int = 0  # > 0: every message is a batch of ``batch`` invalid readings, about this size
    raw: bool = False  # QoS 0 PUBLISH packets written to a socket, no client library (the fastest flood)
    metric: str = "temperature"  # of every reading (shelf_weight in kg feeds the shelf-stock model)
    unit: str = "C"
    topic_root: str = ""  # '': each device's telemetry topic; else '{topic_root}/{device}' (no ingest)


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


class JunkBatch:
    """Batches of ``items`` reading-shaped items that ingest must refuse one by one (``value`` is a
    string: ``wrong_type``), padded so that a message is about ``size`` bytes: a hostile device's
    large bad batch. Every item has its own seq, so each dead letter it causes is distinct."""

    def __init__(self, site: str, items: int, size: int, prefix: str = "junk") -> None:
        device = f"{prefix}-00000"
        self.topics = [Topics(site=site).telemetry(device)]
        self._head = b'{"device":"%s","seq":' % device.encode()
        sample = self._item(items, time.time_ns(), b"")  # a typical item with no padding, and a comma
        self._pad = b"x" * max(1, size // max(1, items) - len(sample) - 1)
        self._items = items
        self._seq = 0

    def _item(self, seq: int, ts: int, pad: bytes) -> bytes:
        return self._head + b'%d,"ts":%d,"metric":"t","value":"%s","unit":"C"}' % (seq, ts, pad)

    def make(self, device: int, ts: int) -> bytes:
        del device
        seq, self._seq = self._seq, self._seq + self._items
        return b"[" + b",".join([self._item(s, ts, self._pad) for s in range(seq, seq + self._items)]) + b"]"


class Payloads:
    """Readings for ``devices`` devices, built with bytes formatting (about 0.5 us a reading, half of
    what building a dict and ``orjson.dumps`` costs), one message at a time."""

    def __init__(
        self,
        site: str,
        devices: int,
        batch: int,
        prefix: str = "bench-dev",
        *,
        metric: str = "temperature",
        unit: str = "C",
        topic_root: str = "",
    ) -> None:
        names = [f"{prefix}-{i:05d}" for i in range(devices)]
        topics = Topics(site=site)
        self.topics = [f"{topic_root}/{n}" if topic_root else topics.telemetry(n) for n in names]
        self._tail = _TAIL % (metric.encode(), unit.encode())
        self._heads = [b'{"device":"%s","seq":' % n.encode() for n in names]
        self._seqs = [0] * devices
        self.batch = batch
        self._v = 0

    def _reading(self, head: bytes, seq: int, ts: int) -> bytes:
        self._v = (self._v + 1) & 63
        return head + b'%d,"ts":%d' % (seq, ts) + self._tail % _VALUES[self._v]

    def make(self, device: int, ts: int) -> bytes:
        """The next message of ``device``: one reading (an object) or a batch (a list)."""
        seq = self._seqs[device]
        self._seqs[device] = seq + self.batch
        head = self._heads[device]
        if self.batch == 1:
            return self._reading(head, seq, ts)
        return b"[" + b",".join([self._reading(head, s, ts) for s in range(seq, seq + self.batch)]) + b"]"


class Stamps(Protocol):
    """A shared array of int64 (``multiprocessing.RawArray('q', n)``)."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> int: ...
    def __setitem__(self, i: int, v: int) -> None: ...


def run_publisher(spec: LoadSpec, ch: Channels, stamps: Stamps | None = None) -> None:
    """Process entry point: connect, wait for ``go``, publish until ``stop_pub``, report.

    With ``stamps`` (paced mode), message *k*'s ``ts`` is written to ``stamps[k]`` while it fits:
    a far end that sees only an id derived from the reading (an agent's decision) finds its send
    time there."""
    with reporting(ch, "load", spec) as result:
        result.update(_publish(spec, ch, stamps))


def _publish(spec: LoadSpec, ch: Channels, stamps: Stamps | None = None) -> dict[str, Any]:
    if spec.raw:
        return _publish_raw(spec, ch)
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
    elif spec.junk_bytes:
        payloads = JunkBatch(spec.site, spec.batch, spec.junk_bytes, spec.device_prefix)
    else:
        payloads = Payloads(
            spec.site,
            spec.devices,
            spec.batch,
            spec.device_prefix,
            metric=spec.metric,
            unit=spec.unit,
            topic_root=spec.topic_root,
        )
    t0 = time.perf_counter()
    if spec.rate > 0:
        msgs, nbytes, errors = _paced(client, spec, payloads, ch, stamps)
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
    qos, batch, window, ndev, limit = spec.qos, spec.batch, spec.window, len(topics), spec.limit
    every = 7 if qos else 63  # loop() reads PUBACKs and pings between publishes
    msgs = nbytes = errors = sent = dev = 0
    while not limit or msgs < limit:
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


def _paced(
    client: Any, spec: LoadSpec, payloads: PayloadSource, ch: Channels, stamps: Stamps | None = None
) -> tuple[int, int, int]:
    publish, loop, make, topics = client.publish, client.loop, payloads.make, payloads.topics
    stop, sent_cell = ch.stop_pub, ch.sent
    qos, batch, ndev, limit = spec.qos, spec.batch, len(topics), spec.limit
    nstamps = len(stamps) if stamps is not None else 0
    interval = batch / spec.rate
    msgs = nbytes = errors = dev = 0
    start = time.perf_counter()
    while not stop.value and (not limit or msgs < limit):
        wait = start + msgs * interval - time.perf_counter()
        if wait > 0:
            loop(min(wait, 0.002))  # sleeps in select() and reads PUBACKs meanwhile
            continue
        ts = time.time_ns()
        payload = make(dev, ts)
        if msgs < nstamps:
            stamps[msgs] = ts  # type: ignore[index]
        if publish(topics[dev], payload, qos).rc:
            errors += 1
        dev = dev + 1 if dev + 1 < ndev else 0
        msgs += 1
        nbytes += len(payload)
        sent_cell.value = msgs * batch
        if not msgs & 63:
            loop(0.0)
    return msgs, nbytes, errors


# --- the raw flood -----------------------------------------------------------------------------------


def _packet(first: int, body: bytes) -> bytes:
    """An MQTT packet: fixed header byte, remaining length (variable-length integer), body."""
    n, length = len(body), bytearray()
    while True:
        n, digit = divmod(n, 128)
        length.append(digit | 0x80 if n else digit)
        if not n:
            return bytes([first]) + bytes(length) + body


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


RAW_CHUNK = 256  # messages built and written with one sendall


def _publish_raw(spec: LoadSpec, ch: Channels) -> dict[str, Any]:
    """MQTT 3.1.1 QoS 0 PUBLISH packets, built ``RAW_CHUNK`` at a time and written with ``sendall``:
    no client library in the way, so the offered rate is what the broker reads (TCP backpressure),
    several times what a paho loop reaches. Readings of one chunk share their ``ts``."""
    if spec.qos:
        raise ValueError("the raw publisher sends QoS 0 only")
    sock = socket.create_connection((spec.host, spec.port), timeout=15.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        connect = _utf8("MQTT") + bytes([4, 0x02]) + (60).to_bytes(2, "big") + _utf8(spec.client_id)
        sock.sendall(_packet(0x10, connect))
        ack = sock.recv(4)
        if len(ack) < 4 or ack[0] != 0x20 or ack[3] != 0:
            raise BrokerError(f"the broker refused the raw publisher: CONNACK {ack!r}")
        ch.pub_ready.set()
        while not ch.go.value:
            if ch.stop_pub.value:
                return {"sent": 0, "msgs": 0}
            time.sleep(0.002)
        payloads = Payloads(spec.site, spec.devices, spec.batch, spec.device_prefix)
        heads = [_utf8(t) for t in payloads.topics]
        ndev, limit, stop, sent_cell = len(heads), spec.limit, ch.stop_pub, ch.sent
        msgs = nbytes = dev = 0
        error = None
        t0 = time.perf_counter()
        while not stop.value and (not limit or msgs < limit):
            n = RAW_CHUNK if not limit else min(RAW_CHUNK, limit - msgs)
            ts = time.time_ns()
            chunk = []
            for _ in range(n):
                payload = payloads.make(dev, ts)
                nbytes += len(payload)
                chunk.append(_packet(0x30, heads[dev] + payload))
                dev = dev + 1 if dev + 1 < ndev else 0
            try:
                sock.sendall(b"".join(chunk))
            except OSError as exc:  # the broker stopped reading for 15 s, or dropped us
                error = f"{type(exc).__name__}: {exc}"
                break
            msgs += n
            sent_cell.value = msgs * spec.batch
        elapsed = time.perf_counter() - t0
        with contextlib.suppress(OSError):
            sock.sendall(b"\xe0\x00")  # DISCONNECT: the broker drops no will, reads what came before
        return {
            "sent": msgs * spec.batch,
            "msgs": msgs,
            "errors": 0,
            "send_error": error,
            "elapsed_s": elapsed,
            "payload_bytes_mean": nbytes / msgs if msgs else 0.0,
        }
    finally:
        sock.close()
