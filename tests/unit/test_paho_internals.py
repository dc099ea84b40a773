"""The paho-mqtt internals the bus relies on (outpost.paho_internals) still mean what it assumes.

Fails when the installed paho is not the pinned one, or when an attribute the adapter reads is
missing or changes meaning. No broker: a real ``paho.Client`` that never connects, fed packets
through a socket pair where a connection is needed."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt as paho_mqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from outpost.paho_internals import (
    PINNED_PAHO,
    is_outgoing,
    outgoing_count,
    outgoing_locked,
    read_waiting,
    wake,
)

ROOT = Path(__file__).resolve().parents[2]
PUBACK = 0x40


@pytest.fixture
def client() -> Iterator[paho.Client]:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="paho-internals-test")
    yield c
    for name in ("_sock", "_sockpairR", "_sockpairW"):
        s = getattr(c, name, None)
        if s is not None:
            s.close()


@pytest.fixture
def peer(client: paho.Client) -> Iterator[socket.socket]:
    """The broker's end of a socket pair whose other end is the client's socket (as after connect)."""
    mine, theirs = socket.socketpair()
    mine.setblocking(False)
    client._sock = mine
    yield theirs
    theirs.close()


def puback(mid: int) -> bytes:
    """An MQTT 3.1.1 PUBACK for ``mid``."""
    return bytes([PUBACK, 2]) + struct.pack("!H", mid)


# --- the version --------------------------------------------------------------------------------
def test_installed_paho_is_the_pinned_one() -> None:
    assert paho_mqtt.__version__ == PINNED_PAHO, (
        f"paho-mqtt {paho_mqtt.__version__} is installed, the adapter was checked against {PINNED_PAHO}: "
        "recheck shared/outpost/paho_internals.py against the new paho, then update PINNED_PAHO"
    )
    assert importlib.metadata.version("paho-mqtt") == PINNED_PAHO


def test_pyproject_pins_the_same_paho() -> None:
    pins = re.findall(r'"paho-mqtt==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pins == [PINNED_PAHO]


# --- the attributes, on a client that never connected --------------------------------------------
def test_out_message_mutex_is_a_reentrant_lock(client: paho.Client) -> None:
    lock = client._out_message_mutex
    with lock, lock:  # paho takes it again inside (publish, on_publish): it must be reentrant
        pass
    assert type(lock) is type(threading.RLock())
    with outgoing_locked(client):
        other: list[bool] = []
        t = threading.Thread(target=lambda: other.append(lock.acquire(blocking=False)))
        t.start()
        t.join()
        assert other == [False]  # held: no other thread gets it
    assert lock.acquire(blocking=False)
    lock.release()


def test_out_messages_is_a_table_keyed_by_mid(client: paho.Client) -> None:
    assert outgoing_count(client) == 0
    a = client.publish("t/a", b"1", qos=1)  # not connected: queued until it is
    b = client.publish("t/b", b"2", qos=1)
    assert a.rc == MQTTErrorCode.MQTT_ERR_NO_CONN
    assert a.mid != b.mid
    table = client._out_messages
    assert list(table) == [a.mid, b.mid]
    assert table[a.mid].mid == a.mid
    assert table[a.mid].topic == "t/a"
    with outgoing_locked(client):
        assert is_outgoing(client, a.mid)
        assert is_outgoing(client, b.mid)
        assert not is_outgoing(client, b.mid + 1000)
    assert outgoing_count(client) == 2


def test_sockpair_is_none_before_the_loop_and_wake_is_then_harmless(client: paho.Client) -> None:
    assert client._sockpairW is None
    assert client._sock is None
    wake(client)  # nothing to wake, nothing raised


def test_wake_writes_to_the_loops_socket_pair(client: paho.Client) -> None:
    assert client.loop(timeout=0) == MQTTErrorCode.MQTT_ERR_NO_CONN  # creates the pair
    assert isinstance(client._sockpairW, socket.socket)
    assert isinstance(client._sockpairR, socket.socket)
    wake(client)
    client._sockpairR.settimeout(1)
    assert client._sockpairR.recv(1) == b"0"  # select() on _sockpairR returns


def test_wake_after_the_pair_is_closed_is_harmless(client: paho.Client) -> None:
    client.loop(timeout=0)
    assert client._sockpairW is not None
    client._sockpairW.close()
    wake(client)  # OSError suppressed


def test_private_methods_keep_their_signatures() -> None:
    read = inspect.signature(paho.Client._packet_read)
    assert list(read.parameters) == ["self"]
    assert read.return_annotation in (MQTTErrorCode, "MQTTErrorCode")
    handle = inspect.signature(paho.Client._loop_rc_handle)
    assert list(handle.parameters) == ["self", "rc"]
    assert handle.return_annotation in (MQTTErrorCode, "MQTTErrorCode")


def test_error_codes_keep_their_meaning() -> None:
    # read_waiting: > 0 is an error for _loop_rc_handle, AGAIN (negative) is "nothing more to read"
    assert MQTTErrorCode.MQTT_ERR_AGAIN < 0
    assert int(MQTTErrorCode.MQTT_ERR_SUCCESS) == 0
    assert MQTTErrorCode.MQTT_ERR_NO_CONN > 0
    assert MQTTErrorCode.MQTT_ERR_CONN_LOST > 0


def test_read_waiting_without_a_connection(client: paho.Client) -> None:
    assert read_waiting(client) == MQTTErrorCode.MQTT_ERR_NO_CONN


# --- the meaning: PUBACKs read from a socket --------------------------------------------------------
def test_on_publish_runs_under_the_lock_while_the_message_is_still_outgoing(
    client: paho.Client, peer: socket.socket
) -> None:
    """What the bus's publish-confirmation check relies on: paho holds ``_out_message_mutex`` across
    ``on_publish`` and the removal of the message from ``_out_messages``."""
    info = client.publish("t/a", b"1", qos=1)
    seen: list[tuple[int, bool, bool]] = []

    def on_publish(c: paho.Client, _ud: Any, mid: int, _rc: Any, _props: Any) -> None:
        other: list[bool] = []
        t = threading.Thread(target=lambda: other.append(c._out_message_mutex.acquire(blocking=False)))
        t.start()
        t.join()
        seen.append((mid, is_outgoing(c, mid), other[0]))

    client.on_publish = on_publish
    peer.send(puback(info.mid))
    assert read_waiting(client) == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert seen == [(info.mid, True, False)]  # in the table, and the lock held, during the callback
    with outgoing_locked(client):
        assert not is_outgoing(client, info.mid)  # removed once the callback returned
    assert outgoing_count(client) == 0
    assert info.is_published()


def test_read_waiting_reads_every_waiting_packet_in_one_call(
    client: paho.Client, peer: socket.socket
) -> None:
    mids = [client.publish(f"t/{i}", b"x", qos=1).mid for i in range(5)]
    confirmed: list[int] = []
    client.on_publish = lambda _c, _ud, mid, _rc, _p: confirmed.append(mid)
    peer.send(b"".join(puback(m) for m in mids))
    assert read_waiting(client) == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert confirmed == mids  # all five, not one a call as loop_read() reads with nothing in flight
    assert outgoing_count(client) == 0
    assert read_waiting(client) == MQTTErrorCode.MQTT_ERR_SUCCESS  # nothing waiting: AGAIN -> success


def test_read_waiting_stops_at_its_limit(client: paho.Client, peer: socket.socket) -> None:
    mids = [client.publish(f"t/{i}", b"x", qos=1).mid for i in range(4)]
    confirmed: list[int] = []
    client.on_publish = lambda _c, _ud, mid, _rc, _p: confirmed.append(mid)
    peer.send(b"".join(puback(m) for m in mids))
    assert read_waiting(client, limit=3) == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert confirmed == mids[:3]
    read_waiting(client)
    assert confirmed == mids


def test_read_waiting_hands_a_lost_connection_to_paho(client: paho.Client, peer: socket.socket) -> None:
    lost: list[Any] = []
    client.on_disconnect = lambda _c, _ud, _flags, rc, _p: lost.append(rc)
    peer.close()
    assert read_waiting(client) == MQTTErrorCode.MQTT_ERR_CONN_LOST
    assert client._sock is None  # _loop_rc_handle closed it
    assert len(lost) == 1  # and told on_disconnect
    assert read_waiting(client) == MQTTErrorCode.MQTT_ERR_NO_CONN
