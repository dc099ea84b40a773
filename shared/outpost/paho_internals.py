"""The few paho-mqtt internals the bus relies on, in one place, for the pinned paho version.

paho 2.2 has no public way to (a) read every packet already waiting on the socket in one turn
(``loop()`` reads one per select()), (b) wake its select() from another thread, or (c) ask whether a
QoS 1 publish is still waiting for its PUBACK without racing the callback that removes it. The bus
needs all three for its speed and its correctness (docs/bus.md). Each is a function here, and
``tests/unit/test_paho_internals.py`` fails when paho's version or the meaning of these attributes
changes, so an upgrade is a conscious change and not a silent break.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

PINNED_PAHO = "2.2.0"


@contextlib.contextmanager
def outgoing_locked(client: paho.Client) -> Iterator[None]:
    """Hold paho's lock over its outgoing messages. paho holds it across ``on_publish`` and the
    removal of the message from its outgoing table, so under it "still in the table" means "the
    PUBACK has not been handled yet"."""
    with client._out_message_mutex:
        yield


def is_outgoing(client: paho.Client, mid: int) -> bool:
    """Whether publish ``mid`` is still in paho's outgoing table (call under :func:`outgoing_locked`)."""
    return mid in client._out_messages


def outgoing_count(client: paho.Client) -> int:
    """Publishes paho still keeps (sent or queued, not yet acknowledged)."""
    return len(client._out_messages)


def queued_packets(client: paho.Client) -> int:
    """Packets paho holds for the socket, not yet written."""
    return len(client._out_packet)


def wake(client: paho.Client) -> None:
    """Wake the network thread's select() from another thread, as paho does for its own packets."""
    w = client._sockpairW
    if w is not None:
        with contextlib.suppress(OSError):
            w.send(b"0")


def use_socket(client: paho.Client, sock: Any) -> None:
    """Make paho read and write through ``sock`` (an object with the socket's methods, e.g.
    :class:`outpost.packet_filter.FilteringSocket`) from now on: call it from ``on_socket_open``,
    which paho calls after it set its socket and before it writes CONNECT. paho's loop asks the
    object's ``pending()`` before it waits in select()."""
    client._sock = sock


def read_waiting(
    client: paho.Client, limit: int = 256, gate: Callable[[], bool] | None = None
) -> MQTTErrorCode:
    """Read the packets already waiting on the socket, up to ``limit`` and while ``gate()`` allows:
    paho's ``loop_read`` minus its cap of one packet when nothing of ours is in flight (a
    subscriber would otherwise pay a select() and a timer pass per message)."""
    for _ in range(limit):
        if gate is not None and not gate():
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        if client._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        rc = client._packet_read()
        if rc > 0:
            return client._loop_rc_handle(rc)
        if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
    return MQTTErrorCode.MQTT_ERR_SUCCESS
