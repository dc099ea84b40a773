"""The broker config shipped in compose/ starts on the users and ACL that ``outpost up`` generates
(``broker.files``, :meth:`SiteAccess.publish`): anonymous clients and wrong passwords are refused, a
device writes only its own telemetry, a service only what its ACL rows allow."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from outpost.access import SiteAccess, service_user
from outpost.broker import free_port, port_open
from outpost.services.registry import OutpostSettings
from outpost.topics import Topics

pytestmark = pytest.mark.integration
COMPOSE = Path(__file__).resolve().parents[2] / "compose" / "mosquitto"
WAIT = 30.0  # generous: every wait returns as soon as what it waits for happens
TOPICS = Topics(site="s")


@dataclass
class Broker:
    port: int
    access: SiteAccess


@pytest.fixture
def compose_broker(tmp_path: Path) -> Iterator[Broker]:
    port = free_port()
    (tmp_path / "data").mkdir()
    access = SiteAccess.of(tmp_path / "site", TOPICS)
    access.enroll(["fridge-1", "fridge-2"])
    access.write(tmp_path / "run", OutpostSettings.SERVICES)  # what outpost up writes
    conf = (COMPOSE / "mosquitto.conf").read_text()
    assert "/mosquitto/run/passwd" in conf and "/mosquitto/run/acl" in conf
    conf = conf.replace("listener 1883 0.0.0.0", f"listener {port} 127.0.0.1")
    conf = conf.replace("/mosquitto/data/", f"{tmp_path}/data/")
    conf = conf.replace("/mosquitto/run/", f"{tmp_path}/run/")
    conf = conf.replace("log_dest stdout", f"log_dest file {tmp_path}/log\nuser root")
    (tmp_path / "m.conf").write_text(conf)
    proc = subprocess.Popen(["mosquitto", "-c", str(tmp_path / "m.conf")])
    deadline = time.monotonic() + WAIT
    while not port_open("127.0.0.1", port) and time.monotonic() < deadline:
        threading.Event().wait(0.02)
    yield Broker(port, access)
    proc.terminate()
    proc.wait(10)


def _client(port: int, user: str | None, password: str | None) -> tuple[paho.Client, list[object]]:
    """A connected client and the CONNACK's reason (a list: filled when it answers)."""
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"{user}-c")
    if user is not None:
        c.username_pw_set(user, password)
    answer: list[object] = []
    c.on_connect = lambda _c, _u, _f, reason, _p: answer.append(reason)
    c.connect("127.0.0.1", port)
    c.loop_start()
    deadline = time.monotonic() + WAIT
    while not answer and time.monotonic() < deadline:
        threading.Event().wait(0.02)
    return c, answer


def _refused(port: int, user: str | None, password: str | None) -> bool:
    c, answer = _client(port, user, password)
    c.loop_stop()
    return bool(answer) and bool(getattr(answer[0], "is_failure", False))


def test_anonymous_and_wrong_passwords_refused(compose_broker: Broker) -> None:
    b = compose_broker
    assert _refused(b.port, None, None)
    assert _refused(b.port, service_user("ingest"), "wrong")
    assert _refused(b.port, "fridge-1", "wrong")
    assert not _refused(b.port, "fridge-1", b.access.device_password("fridge-1"))


def test_device_and_service_write_only_their_rows(compose_broker: Broker) -> None:
    b = compose_broker
    got: list[str] = []
    root = TOPICS.root
    listeners = []
    # ingest reads the devices' topics, inference the events: what each hears is what got through
    for name, pattern in (("ingest", f"{root}/dev/#"), ("inference", f"{root}/events/+")):
        ready = threading.Event()
        c, _ = _client(b.port, service_user(name), b.access.password(service_user(name)))
        c.on_message = lambda _c, _u, m: got.append(m.topic)
        c.on_subscribe = lambda *_, ready=ready: ready.set()
        c.subscribe(pattern, qos=1)
        assert ready.wait(WAIT)
        listeners.append(c)
    svc = listeners[0]
    dev, _ = _client(b.port, "fridge-1", b.access.device_password("fridge-1"))
    dev.publish(TOPICS.telemetry("fridge-1"), b"{}", qos=1).wait_for_publish(WAIT)
    dev.publish(TOPICS.telemetry("fridge-2"), b"{}", qos=1).wait_for_publish(WAIT)
    dev.publish(TOPICS.events("fridge-1"), b"[]", qos=1).wait_for_publish(WAIT)
    # a service outside its rows: ingest writes events, never a device's telemetry
    svc.publish(TOPICS.telemetry("fridge-2"), b"{}", qos=1).wait_for_publish(WAIT)
    svc.publish(TOPICS.events("fridge-9"), b"[]", qos=1).wait_for_publish(WAIT)
    dev.publish(TOPICS.telemetry("fridge-1"), b"{}", qos=1).wait_for_publish(WAIT)
    deadline = time.monotonic() + WAIT
    while len(got) < 3 and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    threading.Event().wait(0.3)
    assert sorted(got) == sorted([TOPICS.telemetry("fridge-1")] * 2 + [TOPICS.events("fridge-9")])
    for c in (dev, *listeners):
        c.loop_stop()
