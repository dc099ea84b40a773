"""The plain paho-mqtt clients the benchmark's own processes use (not :class:`outpost.bus.Bus`).

The load generator and the sinks must cost as little as possible and must not share code with the
service under test, so they drive paho directly: no network thread, ``loop()`` called by hand, and
TCP_NODELAY like the bus. They speak paho's default protocol, MQTT 3.1.1, as most devices do: paho
decodes an MQTT 5 PUBLISH's properties in Python, which makes each received message cost about 2.4x
as much (docs/bus.md). ``mqtt5=True`` gives the bus's protocol, to measure exactly that.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from outpost.errors import BrokerError


def _nodelay(_c: Any, _u: Any, sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def paho_client(client_id: str, *, mqtt5: bool = False, persistent: bool = False) -> paho.Client:
    """A paho client with TCP_NODELAY and no limit on its own publish queue. ``persistent`` (MQTT
    3.1.1 only): a session the broker keeps while the client is away (``clean_session`` false)."""
    c = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if mqtt5 else not persistent,
    )
    c.on_socket_open = _nodelay
    c.max_queued_messages_set(0)
    return c


def connect(client: paho.Client, host: str, port: int, timeout_s: float = 15.0) -> None:
    """Connect and run the loop until the broker's CONNACK arrives."""
    client.connect(host, port, keepalive=60)
    deadline = time.monotonic() + timeout_s
    while not client.is_connected():
        if time.monotonic() > deadline:
            raise BrokerError(f"no CONNACK from {host}:{port} within {timeout_s}s")
        client.loop(0.05)


def subscribe(client: paho.Client, patterns: list[tuple[str, int]], timeout_s: float = 15.0) -> None:
    """Subscribe and run the loop until every SUBACK has arrived."""
    acked: set[int] = set()
    client.on_subscribe = lambda _c, _u, mid, _rc, _p: acked.add(mid)
    mids = {client.subscribe(pattern, qos=qos)[1] for pattern, qos in patterns}
    deadline = time.monotonic() + timeout_s
    while not mids <= acked:
        if time.monotonic() > deadline:
            raise BrokerError(f"no SUBACK for {patterns} within {timeout_s}s")
        client.loop(0.05)


def drain(client: paho.Client, done: Any, timeout_s: float) -> bool:
    """Run the loop until ``done()`` is true or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        client.loop(0.01)
    return True
