"""MQTT client comparison: one publisher process -> one subscriber process through a Mosquitto of our
own, the same client library at both ends, QoS 0 and 1, a fixed ~126-byte JSON payload.

Clients: paho-mqtt (its default MQTT 3.1.1, and MQTT 5 as the bus speaks it), Outpost's own
:class:`outpost.bus.Bus`, aiomqtt (one publish awaited at a time, and 100 gathered), and FastStream's
MQTT broker when the ``bench`` extra is installed. Every publisher is windowed like the ingest load
generator (at most ``window`` messages published and not yet received), so the figure is what the
pair sustains, not how much Mosquitto can buffer. docs/bus.md records the figures and the choice they
led to.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from outpost.benchmarks.channels import Channels, reporting, spawn_context
from outpost.benchmarks.load import Fixed, LoadSpec, run_publisher
from outpost.benchmarks.mqtt import connect, paho_client, subscribe
from outpost.benchmarks.phase import BenchError, Procs, cpu_between, drain
from outpost.broker import Mosquitto
from outpost.bus import Bus
from outpost.settings import MqttSettings
from outpost.topics import Topics

PAYLOAD_BYTES = 126
CLIENTS = ("paho", "paho-mqtt5", "bus", "aiomqtt", "aiomqtt-gather100", "faststream")


@dataclass(frozen=True)
class ClientSpec:
    client: str
    host: str
    port: int
    qos: int
    site: str
    window: int = 5000
    payload_bytes: int = PAYLOAD_BYTES

    @property
    def topic(self) -> str:
        return Topics(site=self.site).telemetry("bench-dev-00001")

    @property
    def payload(self) -> bytes:
        return Fixed(self.topic, self.payload_bytes).make(0, 0)


def faststream_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("faststream", "zmqtt"))


def protocol_of(client: str) -> str:
    return "5" if client in ("paho-mqtt5", "bus") else "3.1.1"


# --- publishers ------------------------------------------------------------------------------------


def run_client_publisher(spec: ClientSpec, ch: Channels) -> None:
    """Process entry point for every client's publisher."""
    if spec.client in ("paho", "paho-mqtt5"):
        load = LoadSpec(
            host=spec.host,
            port=spec.port,
            site=spec.site,
            qos=spec.qos,
            window=spec.window,
            client_id=f"cmp-pub-{spec.site}",
            device_prefix="bench-dev-00001",
            payload_bytes=spec.payload_bytes,
            mqtt5=spec.client == "paho-mqtt5",
        )
        run_publisher(load, ch)
        return
    with reporting(ch, "load") as result:
        if spec.client == "bus":
            result["sent"] = _pub_bus(spec, ch)
        elif spec.client.startswith("aiomqtt"):
            result["sent"] = asyncio.run(_pub_aiomqtt(spec, ch, gather=100 if "gather" in spec.client else 0))
        elif spec.client == "faststream":
            result["sent"] = asyncio.run(_pub_faststream(spec, ch))
        else:
            raise ValueError(f"unknown client {spec.client!r}")


def _pub_bus(spec: ClientSpec, ch: Channels) -> int:
    """Publishes from a timer on the bus's network thread, as a service's code does (handlers and
    timers run there); the bus's tick is 1 ms so a full window does not stall the loop for long."""
    bus = Bus(MqttSettings(host=spec.host, port=spec.port), client_id=f"cmp-pub-{spec.site}", tick_s=0.001)
    topic, payload, qos, window = spec.topic, spec.payload, spec.qos, spec.window
    received, sent_cell, go, stop = ch.received, ch.sent, ch.go, ch.stop_pub
    sent = [0]

    def burst() -> None:
        if not go.value or stop.value:
            return
        n = sent[0]
        for _ in range(200):
            if n - received.value >= window:
                break
            bus.publish(topic, payload, qos=qos)
            n += 1
        sent[0] = sent_cell.value = n

    bus.every(0.0, burst)
    bus.start()
    ch.pub_ready.set()
    while not stop.value:
        time.sleep(0.01)
    bus.stop(drain_s=15)
    return sent[0]


def _nodelay() -> list[tuple[int, int, int]]:
    return [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def _quiet_logger() -> logging.Logger:
    """aiomqtt warns on every publish while more than 10 are pending (the gathered mode)."""
    logger = logging.getLogger("outpost.bench.aiomqtt")
    logger.setLevel(logging.ERROR)
    return logger


async def _wait_go(ch: Channels) -> None:
    while not ch.go.value and not ch.stop_pub.value:
        await asyncio.sleep(0.002)


async def _pub_aiomqtt(spec: ClientSpec, ch: Channels, *, gather: int) -> int:
    import aiomqtt

    topic, payload, qos, window = spec.topic, spec.payload, spec.qos, spec.window
    received, sent_cell, stop = ch.received, ch.sent, ch.stop_pub
    sent = 0
    async with aiomqtt.Client(
        spec.host,
        spec.port,
        identifier=f"cmp-pub-{spec.site}",
        logger=_quiet_logger(),
        socket_options=_nodelay(),
        max_inflight_messages=1000,
    ) as client:
        ch.pub_ready.set()
        await _wait_go(ch)
        while not stop.value:
            if sent - received.value >= window:
                await asyncio.sleep(0.0005)
                continue
            if gather:
                await asyncio.gather(*(client.publish(topic, payload, qos=qos) for _ in range(gather)))
                sent += gather
            else:
                await client.publish(topic, payload, qos=qos)
                sent += 1
            sent_cell.value = sent
    return sent


async def _pub_faststream(spec: ClientSpec, ch: Channels) -> int:
    from faststream.mqtt import MQTTBroker, QoS

    topic, payload, qos, window = spec.topic, spec.payload, QoS(spec.qos), spec.window
    received, sent_cell, stop = ch.received, ch.sent, ch.stop_pub
    broker = MQTTBroker(
        f"mqtt://{spec.host}:{spec.port}", client_id=f"cmp-pub-{spec.site}", version="3.1.1", logger=None
    )
    await broker.connect()
    ch.pub_ready.set()
    await _wait_go(ch)
    sent = 0
    while not stop.value:
        if sent - received.value >= window:
            await asyncio.sleep(0.0005)
            continue
        await broker.publish(payload, topic=topic, qos=qos)
        sent += 1
        sent_cell.value = sent
    await broker.stop()
    return sent


# --- subscribers -----------------------------------------------------------------------------------


def run_client_subscriber(spec: ClientSpec, ch: Channels) -> None:
    """Process entry point for every client's subscriber: counts messages into ``received``."""
    with reporting(ch, "sink") as result:
        if spec.client in ("paho", "paho-mqtt5"):
            result["received"] = _sub_paho(spec, ch, mqtt5=spec.client == "paho-mqtt5")
        elif spec.client == "bus":
            result["received"] = _sub_bus(spec, ch)
        elif spec.client.startswith("aiomqtt"):
            result["received"] = asyncio.run(_sub_aiomqtt(spec, ch))
        elif spec.client == "faststream":
            result["received"] = asyncio.run(_sub_faststream(spec, ch))
        else:
            raise ValueError(f"unknown client {spec.client!r}")


def _sub_paho(spec: ClientSpec, ch: Channels, *, mqtt5: bool) -> int:
    client = paho_client(f"cmp-sub-{spec.site}", mqtt5=mqtt5)
    received = ch.received
    n = [0]

    def on_message(_c: Any, _u: Any, _msg: Any) -> None:
        n[0] += 1
        received.value += 1

    client.on_message = on_message
    connect(client, spec.host, spec.port)
    subscribe(client, [(spec.topic, spec.qos)])
    ch.sink_ready.set()
    while not ch.stop_sink.value:
        client.loop(0.05)
    client.disconnect()
    return n[0]


def _sub_bus(spec: ClientSpec, ch: Channels) -> int:
    bus = Bus(MqttSettings(host=spec.host, port=spec.port), client_id=f"cmp-sub-{spec.site}")
    received = ch.received
    n = [0]

    def handler(_msg: Any) -> None:
        n[0] += 1
        received.value += 1

    bus.subscribe(spec.topic, handler, qos=spec.qos)
    bus.start()
    time.sleep(0.3)  # the bus subscribes on connect; give the SUBACK a moment
    ch.sink_ready.set()
    while not ch.stop_sink.value:
        time.sleep(0.02)
    bus.stop(drain_s=0)
    return n[0]


async def _until_stopped(ch: Channels) -> None:
    while not ch.stop_sink.value:
        await asyncio.sleep(0.02)


async def _sub_aiomqtt(spec: ClientSpec, ch: Channels) -> int:
    import aiomqtt

    received = ch.received
    n = 0
    async with aiomqtt.Client(
        spec.host,
        spec.port,
        identifier=f"cmp-sub-{spec.site}",
        logger=_quiet_logger(),
        socket_options=_nodelay(),
    ) as client:
        await client.subscribe(spec.topic, qos=spec.qos)
        ch.sink_ready.set()

        async def consume() -> None:
            nonlocal n
            async for _msg in client.messages:
                n += 1
                received.value += 1

        task = asyncio.create_task(consume())
        await _until_stopped(ch)
        task.cancel()
    return n


async def _sub_faststream(spec: ClientSpec, ch: Channels) -> int:
    from faststream.mqtt import MQTTBroker, MQTTMessage, QoS

    received = ch.received
    n = [0]
    broker = MQTTBroker(
        f"mqtt://{spec.host}:{spec.port}", client_id=f"cmp-sub-{spec.site}", version="3.1.1", logger=None
    )

    @broker.subscriber(spec.topic, qos=QoS(spec.qos))
    async def handle(msg: MQTTMessage) -> None:  # the raw message: a bytes body would be JSON-decoded
        del msg
        n[0] += 1
        received.value += 1

    await broker.start()
    ch.sink_ready.set()
    await _until_stopped(ch)
    await broker.stop()
    return n[0]


# --- the run ----------------------------------------------------------------------------------------


def _wait(
    what: str, ok: Callable[[], bool], timeout_s: float, procs: list[BaseProcess], ch: Channels
) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        for p in procs:
            if p.exitcode is not None:
                got = ch.take_results(2, 1.0)
                raise BenchError(f"{what}: {p.name} exited: {got}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready within {timeout_s}s")
        time.sleep(0.01)


def run_pair(broker: Mosquitto, spec: ClientSpec, *, warmup_s: float, measure_s: float) -> dict[str, Any]:
    """One client at one QoS: msgs/s received in the window, and what each process cost."""
    ctx = spawn_context()
    ch = Channels.create(ctx)
    sub: BaseProcess = ctx.Process(target=run_client_subscriber, args=(spec, ch), name="sub", daemon=True)
    pub: BaseProcess = ctx.Process(target=run_client_publisher, args=(spec, ch), name="pub", daemon=True)
    try:
        sub.start()
        pub.start()
        procs = Procs()
        procs.add("sub", sub.pid)
        procs.add("pub", pub.pid)
        procs.add("mosquitto", broker.proc.pid if broker.proc is not None else None)
        _wait("subscriber", ch.sink_ready.is_set, 30, [sub, pub], ch)
        _wait("publisher", ch.pub_ready.is_set, 30, [sub, pub], ch)
        ch.go.value = 1
        time.sleep(warmup_s)
        a = procs.sample(ch)
        time.sleep(measure_s)
        b = procs.sample(ch)
        ch.stop_pub.value = 1
        pub.join(30)
        sent = ch.sent.value
        received = drain(ch, sent, 30.0)
        ch.stop_sink.value = 1
        results = ch.take_results(2, 20)
        sub.join(10)
    finally:
        for p in (pub, sub):
            if p.is_alive():
                p.terminate()
                p.join(5)
    errors = [f"{role}: {r['error'].strip().splitlines()[-1]}" for role, r in results.items() if "error" in r]
    return {
        "client": spec.client,
        "protocol": protocol_of(spec.client),
        "qos": spec.qos,
        "msgs_per_s": round((b.received - a.received) / (b.t - a.t), 1),
        "sent": sent,
        "received": received,
        "undelivered": max(0, sent - received),  # when the drain stalled: lost, at QoS 1 a failure
        "cpu_pct": cpu_between(a, b),
        "error": "; ".join(errors) or None,
    }


def run_clients_bench(
    *,
    clients: tuple[str, ...] = CLIENTS,
    qos_levels: tuple[int, ...] = (0, 1),
    warmup_s: float = 1.0,
    measure_s: float = 4.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every client at every QoS against one Mosquitto of our own; the figures as a dict."""
    from outpost.benchmarks.ingest import machine

    say = progress or (lambda _m: None)
    started = time.monotonic()
    host = machine()
    runs: list[dict[str, Any]] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="outpost-bench-bus-") as tmp:
        os.chmod(tmp, 0o711)  # Mosquitto, started as root, runs as user mosquitto and must reach it
        with Mosquitto(Path(tmp) / "b") as broker:
            for client in clients:
                if client == "faststream" and not faststream_available():
                    skipped.append("faststream (not installed: pip install -e '.[bench]')")
                    continue
                for qos in qos_levels:
                    site = f"cmp-{client}-q{qos}"
                    spec = ClientSpec(client=client, host=broker.host, port=broker.port, qos=qos, site=site)
                    say(f"{client} QoS {qos} ...")
                    row = run_pair(broker, spec, warmup_s=warmup_s, measure_s=measure_s)
                    cpu = " ".join(f"{k} {v:.0f}%" for k, v in row["cpu_pct"].items())
                    say(f"{client} QoS {qos}: {row['msgs_per_s']:,.0f} msgs/s; CPU {cpu}")
                    runs.append(row)
    host["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    return {
        "bench": "bus",
        "machine": host,
        "options": {
            "payload_bytes": PAYLOAD_BYTES,
            "window": ClientSpec.window,
            "warmup_s": warmup_s,
            "measure_s": measure_s,
        },
        "runs": runs,
        "skipped": skipped,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
