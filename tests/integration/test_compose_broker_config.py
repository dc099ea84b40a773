"""The broker config shipped in compose/ starts, and its ACL confines devices to their own topics."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from outpost.broker import free_port, port_open

pytestmark = pytest.mark.integration
COMPOSE = Path(__file__).resolve().parents[2] / "compose" / "mosquitto"
WAIT = 30.0  # generous: every wait returns as soon as what it waits for happens


@pytest.fixture
def compose_broker(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    (tmp_path / "data").mkdir()
    conf = (COMPOSE / "mosquitto.conf").read_text()
    conf = conf.replace("listener 1883 0.0.0.0", f"listener {port} 127.0.0.1")
    conf = conf.replace("/mosquitto/data/", f"{tmp_path}/data/")
    conf = conf.replace("/mosquitto/config/acl", str(COMPOSE / "acl"))
    conf = conf.replace("/mosquitto/config/passwd", str(tmp_path / "passwd"))
    conf = conf.replace("log_dest stdout", f"log_dest file {tmp_path}/log\nuser root")
    (tmp_path / "passwd").write_text("")
    for user in ("fridge-1", "fridge-2", "outpost"):
        subprocess.run(["mosquitto_passwd", "-b", str(tmp_path / "passwd"), user, "pw"], check=True)
    (tmp_path / "m.conf").write_text(conf)
    proc = subprocess.Popen(["mosquitto", "-c", str(tmp_path / "m.conf")])
    deadline = time.monotonic() + WAIT
    while not port_open("127.0.0.1", port) and time.monotonic() < deadline:
        threading.Event().wait(0.02)
    yield port, proc
    proc.terminate()
    proc.wait(10)


def _client(port: int, user: str) -> paho.Client:
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=user + "-c")
    c.username_pw_set(user, "pw")
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def test_device_writes_only_its_own_telemetry(compose_broker: tuple[int, subprocess.Popen[bytes]]) -> None:
    port, _ = compose_broker
    got: list[str] = []
    ready = threading.Event()
    svc = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="svc")
    svc.username_pw_set("outpost", "pw")
    svc.on_message = lambda _c, _u, m: got.append(m.topic)
    svc.on_subscribe = lambda *_: ready.set()
    svc.on_connect = lambda c, *_: c.subscribe("outpost/#", qos=1)
    svc.connect("127.0.0.1", port)
    svc.loop_start()
    assert ready.wait(WAIT)
    dev = _client(port, "fridge-1")
    dev.publish("outpost/v1/s/dev/fridge-1/telemetry", b"{}", qos=1).wait_for_publish(WAIT)
    dev.publish("outpost/v1/s/dev/fridge-2/telemetry", b"{}", qos=1).wait_for_publish(WAIT)
    dev.publish("outpost/v1/s/events/fridge-1", b"[]", qos=1).wait_for_publish(WAIT)
    dev.publish("outpost/v1/s/dev/fridge-1/telemetry", b"{}", qos=1).wait_for_publish(WAIT)
    deadline = time.monotonic() + WAIT
    while len(got) < 2 and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    threading.Event().wait(0.3)
    assert got == ["outpost/v1/s/dev/fridge-1/telemetry"] * 2
    dev.loop_stop()
    svc.loop_stop()
