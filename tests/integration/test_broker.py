"""outpost.broker.Mosquitto: password auth and ACL, persistence across a restart, clear errors."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from outpost.broker import Mosquitto, free_port, port_open
from outpost.bus import Bus, Message
from outpost.errors import BrokerError
from outpost.settings import MqttSettings

pytestmark = pytest.mark.integration

SVC_PASSWORD = "s3rvice-Pa55word"
DEV_PASSWORD = "d3vice-Pa55word"
WAIT = 30.0


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(
        tmp_path / "auth-broker",
        users={"svc": SVC_PASSWORD, "dev1": DEV_PASSWORD},
        acl=[
            "user svc",
            "topic readwrite outpost/#",
            "user dev1",
            "topic write outpost/v1/s1/dev/dev1/#",
        ],
    ).start()
    yield m
    m.stop()


def mqtt(broker: Mosquitto, username: str | None = None, password: str | None = None) -> MqttSettings:
    return MqttSettings(port=broker.port, username=username, password=password)


class Sink:
    def __init__(self) -> None:
        self.got: list[tuple[str, bytes | bytearray]] = []
        self.lock = threading.Lock()

    def __call__(self, msg: Message) -> None:
        with self.lock:
            self.got.append((msg.topic, msg.payload))

    def wait(self, n: int, timeout: float = WAIT) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.got) >= n:
                return True
            time.sleep(0.02)
        return len(self.got) >= n


@pytest.mark.parametrize(
    ("username", "password"),
    [("svc", "wrong"), ("svc", None), (None, None), ("nobody", SVC_PASSWORD), ("svc", DEV_PASSWORD)],
    ids=["wrong-password", "no-password", "anonymous", "unknown-user", "other-users-password"],
)
def test_refuses_bad_credentials(
    auth_broker: Mosquitto, username: str | None, password: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    bus = Bus(mqtt(auth_broker, username, password), client_id=f"bad-{username}")
    with caplog.at_level(logging.DEBUG), pytest.raises(BrokerError, match="refused the connection"):
        bus.start(wait_s=1.0)
    assert not bus.connected
    assert bus.stats()["connects"] == 0
    for secret in (SVC_PASSWORD, DEV_PASSWORD, "wrong"):
        assert secret not in caplog.text


def test_right_credentials_work(auth_broker: Mosquitto) -> None:
    sink = Sink()
    sub = Bus(mqtt(auth_broker, "svc", SVC_PASSWORD), client_id="svc-sub")
    sub.subscribe("outpost/v1/s1/#", sink, qos=1)
    sub.start(wait_s=WAIT)
    pub = Bus(mqtt(auth_broker, "svc", SVC_PASSWORD), client_id="svc-pub")
    pub.start(wait_s=WAIT)
    try:
        pub.publish("outpost/v1/s1/events/dev1", b"hello", qos=1)
        assert pub.drain(WAIT)
        assert sink.wait(1)
        assert sink.got == [("outpost/v1/s1/events/dev1", b"hello")]
    finally:
        pub.stop()
        sub.stop()


def test_acl_confines_a_device_to_its_own_topics(auth_broker: Mosquitto) -> None:
    sink = Sink()
    sub = Bus(mqtt(auth_broker, "svc", SVC_PASSWORD), client_id="svc-sub")
    sub.subscribe("outpost/#", sink, qos=1)
    sub.start(wait_s=WAIT)
    dev = Bus(mqtt(auth_broker, "dev1", DEV_PASSWORD), client_id="dev1")
    dev.start(wait_s=WAIT)
    try:
        dev.publish("outpost/v1/s1/dev/dev2/telemetry", b"spoofed", qos=1)  # another device's topic
        dev.publish("outpost/v1/s1/events/dev1", b"forged event", qos=1)  # a service's topic
        dev.publish("outpost/v1/s1/dev/dev1/telemetry", b"mine", qos=1)
        assert dev.drain(WAIT)
        assert sink.wait(1)
        time.sleep(0.3)  # give anything refused time to (not) arrive
        assert sink.got == [("outpost/v1/s1/dev/dev1/telemetry", b"mine")]
    finally:
        dev.stop()
        sub.stop()


def test_no_plaintext_password_on_disk(auth_broker: Mosquitto) -> None:
    for path in auth_broker.workdir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SVC_PASSWORD.encode() not in data, path
            assert DEV_PASSWORD.encode() not in data, path


def test_retained_message_survives_restart(tmp_path: Path) -> None:
    m = Mosquitto(tmp_path / "persist").start()
    try:
        pub = Bus(mqtt(m), client_id="pub")
        pub.start(wait_s=WAIT)
        pub.publish("outpost/v1/s1/svc/x/status", b"online", qos=1, retain=True)
        assert pub.drain(WAIT)
        pub.stop()
        m.restart()
        sink = Sink()
        sub = Bus(mqtt(m), client_id="sub")
        sub.subscribe("outpost/v1/s1/svc/+/status", sink, qos=1)
        sub.start(wait_s=WAIT)
        assert sink.wait(1)
        assert sink.got == [("outpost/v1/s1/svc/x/status", b"online")]
        sub.stop()
    finally:
        m.stop()


def test_stop_and_kill(tmp_path: Path) -> None:
    m = Mosquitto(tmp_path / "b").start()
    assert m.running
    assert port_open(m.host, m.port)
    m.kill()
    assert not m.running
    m.start()
    assert m.running
    m.stop()
    assert not m.running
    m.stop()  # stopping twice is harmless


def test_a_broker_started_again_in_its_folder_keeps_its_port_while_it_is_free(tmp_path: Path) -> None:
    """With no port set, the first start picks one and the next starts in the same folder take it
    again (a site's devices and a running simulator keep finding it); if something else holds it
    by then, a free one, kept from then on."""
    first = Mosquitto(tmp_path / "b").start()
    port = first.port
    first.stop()
    again = Mosquitto(tmp_path / "b").start()
    try:
        assert again.port == port
    finally:
        again.stop()
    with socket.socket() as holder:  # another program takes the port meanwhile
        holder.bind(("127.0.0.1", port))
        holder.listen()
        moved = Mosquitto(tmp_path / "b").start()
        try:
            assert moved.port != port and port_open(moved.host, moved.port)
        finally:
            moved.stop()
    assert Mosquitto(tmp_path / "b").port == moved.port
    assert Mosquitto(tmp_path / "other").port != moved.port  # another folder: its own


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    first = Mosquitto(tmp_path / "first").start()
    try:
        with pytest.raises(BrokerError, match="already in use"):
            Mosquitto(tmp_path / "second", port=first.port).start(timeout_s=5)
        assert first.start() is first  # starting a running broker again is harmless
    finally:
        first.stop()


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    from outpost.settings import BrokerSettings

    m = Mosquitto(tmp_path / "b", settings=BrokerSettings(binary="no-such-mosquitto"), port=free_port())
    with pytest.raises(BrokerError, match="not found"):
        m.start()
