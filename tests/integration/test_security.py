"""Broker security with real Mosquitto (docs/security.md): the table of outpost.access generated
into the password and ACL files, the TLS listener, the cloud broker of ``outpost cloud
broker-config`` behind a real bridge.

A refused publish is checked two ways: the MQTT 5 PUBACK says "not authorized" (0x87), and a
subscriber that may read the topic never gets it (Mosquitto drops it silently on 3.1.1): the same
connection's next, allowed publish arrives, so the refused one, sent before it, would have too.
"""

from __future__ import annotations

import itertools
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from outpost.access import (
    CLOUD_USER,
    OPERATOR,
    CloudBroker,
    SiteAccess,
    acl_text,
    bridge_user,
    service_user,
)
from outpost.broker import Mosquitto, free_port, port_open, uplink_bridge
from outpost.process import end_process
from outpost.services.registry import OutpostSettings
from outpost.settings import BrokerSettings, UplinkSettings
from outpost.stack import Stack
from outpost.topics import Topics
from tests.conftest import outpost, wait_status
from tests.tls import CA

pytestmark = pytest.mark.integration

WAIT = 10.0
NOT_AUTHORIZED = 0x87
NO_SUBSCRIBERS = 0x10
_ids = itertools.count()


class Client:
    """One MQTT 5 connection whose every answer (CONNACK, SUBACK, PUBACK) the test can read."""

    def __init__(
        self, port: int, user: str | None, password: str | None, *, tls: ssl.SSLContext | None = None
    ):
        self.c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"sec-{os.getpid()}-{next(_ids)}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if user is not None:
            self.c.username_pw_set(user, password)
        if tls is not None:
            self.c.tls_set_context(tls)
        self.port = port
        self.cond = threading.Condition()
        self.connack: Any = None
        self.closed = False
        self.acks: dict[int, Any] = {}
        self.got: list[tuple[str, bytes]] = []
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = lambda _c, _u, mid, codes, _p: self._put(mid, codes)
        self.c.on_publish = lambda _c, _u, mid, code, _p: self._put(mid, code)
        self.c.on_message = self._on_message

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        with self.cond:
            self.connack = reason
            self.cond.notify_all()

    def _on_disconnect(self, *_: Any) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _put(self, mid: int, value: Any) -> None:
        with self.cond:
            self.acks[mid] = value
            self.cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.got.append((msg.topic, bytes(msg.payload)))
            self.cond.notify_all()

    def connect(self) -> bool:
        """True when the broker accepted; False when it refused or closed the connection."""
        try:
            self.c.connect("127.0.0.1", self.port, keepalive=30)
        except (OSError, ssl.SSLError):
            return False
        self.c.loop_start()
        with self.cond:
            self.cond.wait_for(lambda: self.connack is not None or self.closed, WAIT)
        return self.connack is not None and not self.connack.is_failure and not self.closed

    def _answer(self, mid: int) -> Any:
        with self.cond:
            assert self.cond.wait_for(lambda: mid in self.acks, WAIT), "no answer from the broker"
            return self.acks.pop(mid)

    def subscribe(self, pattern: str) -> bool:
        """True when the SUBACK grants the subscription."""
        _rc, mid = self.c.subscribe(pattern, qos=1)
        assert mid is not None
        (code,) = self._answer(mid)
        return not code.is_failure

    def publish(self, topic: str, payload: bytes) -> int:
        """The PUBACK's reason code: 0 accepted (also when no one subscribes: 0x10), 0x87 refused."""
        info = self.c.publish(topic, payload, qos=1)
        code = int(self._answer(info.mid).value)
        return 0 if code == NO_SUBSCRIBERS else code

    def wait_for(self, topic: str, payload: bytes, timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: (topic, payload) in self.got, timeout)

    def topics(self) -> set[str]:
        with self.cond:
            return {t for t, _ in self.got}

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def accepted(port: int, user: str | None, password: str | None, *, tls: ssl.SSLContext | None = None) -> bool:
    """Whether the broker lets this client in (it leaves again at once)."""
    c = Client(port, user, password, tls=tls)
    try:
        return c.connect()
    finally:
        c.close()


SITE = "sec1"
T = Topics(site=SITE)
OTHER = Topics(site="sec2")
DEVICES = ("dev-a", "dev-b")
SERVICES = list(OutpostSettings.SERVICES)


@pytest.fixture(scope="module")
def site_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Mosquitto, SiteAccess, SiteAccess]]:
    root = tmp_path_factory.mktemp("security")
    access = SiteAccess.of(root / "site", T)
    access.enroll(DEVICES)
    other = SiteAccess.of(root / "other", OTHER)  # a device of another site on the same broker
    other.enroll(["dev-x"])
    devices = [p for p in other.principals([]) if p.kind == "device"]
    users = access.passwords(SERVICES) | {"dev-x": other.device_password("dev-x")}
    m = Mosquitto(
        root / "broker", users=users, acl=acl_text([*access.principals(SERVICES), *devices]).splitlines()
    )
    m.start()
    yield m, access, other
    m.stop()


@pytest.fixture
def connect(site_broker: tuple[Mosquitto, SiteAccess, SiteAccess]) -> Iterator[Any]:
    broker, access, other = site_broker
    made: list[Client] = []

    def as_user(user: str) -> Client:
        if user == "dev-x":
            secret = other.device_password(user)
        else:
            secret = access.device_password(user) if user in DEVICES else access.password(user)
        c = Client(broker.port, user, secret)
        assert c.connect(), f"{user} refused"
        made.append(c)
        return c

    yield as_user
    for c in made:
        c.close()


@pytest.mark.parametrize(
    ("user", "password"),
    [(None, None), ("dev-a", "wrong"), (service_user("ingest"), None), ("dev-c", "x")],
    ids=["anonymous", "wrong-password", "no-password", "not-enrolled"],
)
def test_refused_at_connect(
    site_broker: tuple[Mosquitto, SiteAccess, SiteAccess], user: str | None, password: str | None
) -> None:
    broker, access, _ = site_broker
    c = Client(broker.port, user, password)
    try:
        assert not c.connect()
        assert c.connack is None or c.connack.value in (
            0x86,
            0x87,
        )  # bad user name or password / not authorized
    finally:
        c.close()
    # the device's own password works, another device's does not
    assert accepted(broker.port, "dev-a", access.device_password("dev-a"))
    assert not accepted(broker.port, "dev-a", access.device_password("dev-b"))


def test_device_publishes_only_its_own_telemetry_and_status(connect: Any) -> None:
    ingest = connect(service_user("ingest"))
    assert ingest.subscribe(T.all_device_topics)
    dev = connect("dev-a")
    forged = [
        T.telemetry("dev-b"),  # as another device
        T.device_status("dev-b"),
        T.device_cmd("dev-b", "open"),  # a command, to another device or itself
        T.device_cmd("dev-a", "open"),
        T.events("dev-a"),  # past ingest
        OTHER.telemetry("dev-a"),  # another site
    ]
    for topic in forged:
        assert dev.publish(topic, b"forged") == NOT_AUTHORIZED, topic
    assert dev.publish(T.telemetry("dev-a"), b"mine") == 0
    assert dev.publish(T.device_status("dev-a"), b"online") == 0
    assert ingest.wait_for(T.device_status("dev-a"), b"online")
    assert ingest.topics() == {T.telemetry("dev-a"), T.device_status("dev-a")}


def test_device_reads_only_its_own_commands(connect: Any) -> None:
    """Mosquitto 2.0 grants any subscription and checks each message as it delivers it: what a
    device subscribes to beyond its own commands brings it nothing."""
    dev = connect("dev-a")
    for pattern in (f"{T.root}/dev/dev-b/cmd/#", f"{T.root}/#", f"{OTHER.root}/#", "#"):
        dev.subscribe(pattern)
    connectors, ingest, elsewhere = (
        connect(service_user("connectors")),
        connect(service_user("ingest")),
        connect("dev-x"),
    )
    assert connectors.publish(T.device_cmd("dev-b", "open"), b"for b") == 0
    assert ingest.publish(T.events("dev-b"), b"an event") == 0
    assert elsewhere.publish(OTHER.telemetry("dev-x"), b"another site") == 0
    assert connectors.publish(T.device_cmd("dev-a", "open"), b"for a") == 0  # after the others
    assert dev.wait_for(T.device_cmd("dev-a", "open"), b"for a")
    assert dev.topics() == {T.device_cmd("dev-a", "open")}


def test_services_and_operator_confined(connect: Any) -> None:
    """Each service may do what its code does and no more; nobody reads another site."""
    watch = connect(service_user("memory"))  # reads what every stage publishes
    for pattern in (T.all_events, T.all_inference, T.all_decisions, T.all_action_results, T.all_dlq):
        assert watch.subscribe(pattern)
    ingest = connect(service_user("ingest"))
    assert ingest.publish(T.events("dev-a"), b"e") == 0
    assert ingest.publish(T.decisions("a1"), b"forged") == NOT_AUTHORIZED
    assert ingest.publish(T.dlq("agents"), b"as another service") == NOT_AUTHORIZED
    agents = connect(service_user("agents"))
    assert agents.publish(T.device_cmd("dev-a", "open"), b"past the connectors") == NOT_AUTHORIZED
    assert agents.publish(T.decisions("a1"), b"d") == 0
    operator = connect(OPERATOR)
    assert operator.publish(T.telemetry("dev-a"), b"as a device") == NOT_AUTHORIZED
    assert operator.publish(T.escalation_reply("a1", "d1"), b"r") == 0
    assert watch.wait_for(T.decisions("a1"), b"d")
    assert watch.topics() == {T.events("dev-a"), T.decisions("a1")}
    # nobody of site sec1 reads site sec2, whatever it subscribes to
    readers = [connect(service_user("telemetry")), operator, ingest]
    for reader in readers:
        reader.subscribe("#")
    assert agents.publish(T.actions("shop"), b"an action") == 0  # ingest may not read it
    assert connect("dev-x").publish(OTHER.telemetry("dev-x"), b"another site") == 0
    assert connect("dev-a").publish(T.device_status("dev-a"), b"online") == 0  # all three read it
    for reader in readers:
        assert reader.wait_for(T.device_status("dev-a"), b"online")
        assert not any(t.startswith(OTHER.root) for t in reader.topics()), reader.topics()
    assert T.actions("shop") not in ingest.topics()


def _trust(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def test_tls_listener_refuses_an_untrusted_certificate(tmp_path: Path) -> None:
    ca, rogue = CA.create(tmp_path / "ca", "site"), CA.create(tmp_path / "rogue", "rogue")
    server = ca.issue(tmp_path / "ca", "broker", server=True)
    good = ca.issue(tmp_path / "ca", "dev-a", server=False)
    bad = rogue.issue(tmp_path / "rogue", "dev-a", server=False)
    access = SiteAccess.of(tmp_path / "site", T)
    access.enroll(["dev-a"])
    settings = BrokerSettings(
        tls_port=free_port(),
        tls_ca=ca.path,
        tls_cert=server.cert,
        tls_key=server.key,
        require_certificate=True,
    )
    password = access.device_password("dev-a")
    with Mosquitto(
        tmp_path / "b",
        settings=settings,
        users=access.passwords([]),
        acl=acl_text(access.principals([])).splitlines(),
    ):
        port = settings.tls_port
        assert accepted(port, "dev-a", password, tls=_trust(ca.path, good.cert, good.key))
        assert not accepted(port, "dev-a", password, tls=_trust(ca.path, bad.cert, bad.key))
        assert not accepted(port, "dev-a", password, tls=_trust(ca.path))  # no certificate
        assert not accepted(port, "dev-a", password, tls=_trust(rogue.path, good.cert, good.key))


def _run_mosquitto(conf: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + WAIT
    while not port_open("127.0.0.1", port):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the cloud broker did not listen"
        time.sleep(0.02)
    return proc


def test_site_bridge_confined_on_the_cloud_broker(tmp_path: Path) -> None:
    """``outpost cloud broker-config``'s broker, TLS on, with a real bridge from site sec1's edge
    broker (auth on): sec1's up/ arrives and its down/ comes back, and sec1's credentials cannot
    write or read sec2's topics."""
    ca = CA.create(tmp_path / "ca", "cloud")
    server = ca.issue(tmp_path / "ca", "cloud-broker", server=True)
    port = free_port()
    cloud = CloudBroker(
        tmp_path / "cloud",
        "outpost",
        ("sec1", "sec2"),
        host="127.0.0.1",
        port=port,
        tls_cert=server.cert,
        tls_key=server.key,
        run_as="root" if os.geteuid() == 0 else None,
    )
    proc = _run_mosquitto(cloud.write(), port)
    secret = {user: cloud.credentials(user).read_text().strip() for user in (bridge_user("sec1"), CLOUD_USER)}
    uplink = UplinkSettings(
        cloud=f"127.0.0.1:{port}",
        username=bridge_user("sec1"),
        password=secret[bridge_user("sec1")],
        ca=ca.path,
    )
    site = SiteAccess.of(tmp_path / "site", T)  # the edge broker with auth on, as outpost up starts it
    edge = Mosquitto(
        tmp_path / "edge",
        users=site.passwords(SERVICES),
        acl=acl_text(site.principals(SERVICES)).splitlines(),
        extra_conf=uplink_bridge(T, uplink),
    ).start()
    trust = _trust(ca.path)
    made: list[Client] = []
    try:
        receiver = Client(port, CLOUD_USER, secret[CLOUD_USER], tls=trust)
        as_site = Client(port, bridge_user("sec1"), secret[bridge_user("sec1")], tls=trust)
        local = Client(edge.port, service_user("uplink"), site.password(service_user("uplink")))
        made += [receiver, as_site, local]
        assert receiver.connect() and as_site.connect() and local.connect()
        assert receiver.subscribe("outpost/v1/+/up/#")
        # through the real bridge: what sec1 sends up arrives (the bridge may still be connecting)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            local.publish(T.up("uplink", "alerts"), b"via bridge")
            if receiver.wait_for(T.up("uplink", "alerts"), b"via bridge", timeout=0.5):
                break
        assert (T.up("uplink", "alerts"), b"via bridge") in receiver.got
        # sec1's credentials, used directly: nothing of sec2's
        assert as_site.publish(OTHER.up("uplink", "alerts"), b"forged") == NOT_AUTHORIZED
        assert as_site.publish(OTHER.down("uplink", "ack"), b"forged") == NOT_AUTHORIZED
        assert as_site.publish(T.down("uplink", "ack"), b"to itself") == NOT_AUTHORIZED
        assert as_site.publish(T.up("uplink", "events"), b"own") == 0
        assert receiver.wait_for(T.up("uplink", "events"), b"own")
        assert receiver.topics() == {T.up("uplink", "alerts"), T.up("uplink", "events")}
        # what the cloud sends sec2 never reaches sec1's credentials, whatever they subscribe to
        for pattern in (f"{OTHER.root}/down/#", "outpost/v1/+/up/#", "#"):
            as_site.subscribe(pattern)
        assert receiver.publish(OTHER.down("uplink", "ack"), b"for sec2") == 0
        assert receiver.publish(T.down("uplink", "ack"), b"for sec1") == 0
        assert as_site.wait_for(T.down("uplink", "ack"), b"for sec1")
        assert as_site.topics() == {T.down("uplink", "ack")}
        # and down through the bridge into the edge broker, to the service that reads it
        assert local.subscribe(T.down("uplink", "ack"))
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            receiver.publish(T.down("uplink", "ack"), b"acked")
            if local.wait_for(T.down("uplink", "ack"), b"acked", timeout=0.5):
                break
        assert (T.down("uplink", "ack"), b"acked") in local.got
        assert not accepted(port, bridge_user("sec1"), "wrong", tls=trust)
    finally:
        for c in made:
            c.close()
        edge.stop()
        end_process(proc)


def test_the_operator_commands_work_on_the_site_broker(tmp_path: Path) -> None:
    """``outpost up``'s broker with auth on (the default): the commands find the operator's
    credentials in the site's folder and may do what they publish and read (agents' desired state,
    retained, and what the service reports) and read the site's status; a wrong password is refused."""
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
    settings = OutpostSettings(site="ops", data_dir=data)
    with Stack(settings, services={"agents": OutpostSettings.SERVICES["agents"]}):
        assert settings.mqtt.username == OPERATOR
        wait_status(settings, "agents")
        for verb, state in (("stop", "stopped"), ("resume", "running")):
            r = outpost("--data-dir", str(data), "agents", verb, "--all", env=env)
            assert r.returncode == 0 and f"restock: {state}" in r.stdout, r.stdout + r.stderr  # confirmed
        r = outpost("--data-dir", str(data), "status", "--json", env=env)
        assert r.returncode == 0, r.stderr
        assert '"agents":{"state":"online"' in r.stdout
        # OUTPOST_MQTT__USERNAME/PASSWORD win; a wrong password is a clear, quick error
        wrong = env | {"OUTPOST_MQTT__USERNAME": OPERATOR, "OUTPOST_MQTT__PASSWORD": "not-it"}
        r = outpost("--data-dir", str(data), "agents", "stop", "--all", env=wrong)
        assert r.returncode != 0 and "refused the connection" in r.stderr, r.stdout + r.stderr
        assert "not-it" not in r.stdout + r.stderr


def test_outpost_up_writes_the_files_of_a_broker_that_watches_them(tmp_path: Path) -> None:
    """``outpost up --broker`` with ``broker.files`` (compose's broker, run here by its own entry point
    compose/mosquitto-run.sh without a container): the broker waits for the files outpost writes, each
    service connects as its own user, anonymous clients are refused, and ``outpost broker enroll``
    takes effect on the running broker (the script sees the files change and sends SIGHUP)."""
    if os.geteuid() != 0:
        pytest.skip("the broker's entry point hands its files to the user mosquitto: needs root")
    root = Path(__file__).resolve().parents[2]
    port = free_port()
    files, run = tmp_path / "files", tmp_path / "run"
    conf = (root / "compose" / "mosquitto" / "mosquitto.conf").read_text()
    conf = conf.replace("listener 1883 0.0.0.0", f"listener {port} 127.0.0.1")
    conf = conf.replace("/mosquitto/data/", f"{tmp_path}/mdata/").replace("/mosquitto/run/", f"{run}/")
    conf = conf.replace("log_dest stdout", f"log_dest file {tmp_path}/mosquitto.log\nuser root")
    (tmp_path / "mdata").mkdir()
    (tmp_path / "m.conf").write_text(conf)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
    broker = subprocess.Popen(
        ["sh", str(root / "compose" / "mosquitto-run.sh")],
        env=env
        | {
            "MOSQUITTO_AUTH": str(files),
            "MOSQUITTO_RUN": str(run),
            "MOSQUITTO_CONF": str(tmp_path / "m.conf"),
        },
        stdout=subprocess.DEVNULL,
    )
    data = tmp_path / "data"
    settings = OutpostSettings(site="box", data_dir=data)
    settings.broker.files = files
    try:
        with Stack(
            settings,
            external_broker=f"127.0.0.1:{port}",
            services={"agents": OutpostSettings.SERVICES["agents"]},
        ) as stack:
            assert settings.mqtt.username == OPERATOR
            wait_status(settings, "agents")
            access = SiteAccess.of(stack.site_dir, settings.topics)
            assert "user svc.agents" in (files / "acl").read_text()
            assert accepted(port, service_user("agents"), access.password(service_user("agents")))
            assert not accepted(port, None, None)
            assert not accepted(port, service_user("agents"), "wrong")
            # enrolment on the running broker, from another process as the operator would
            r = outpost(
                "--data-dir", str(data), "broker", "enroll", "dev-z", "--json",
                env=env | {"OUTPOST_BROKER__FILES": str(files)},
            )  # fmt: skip
            assert r.returncode == 0, r.stdout + r.stderr
            deadline = time.monotonic() + WAIT
            while not accepted(port, "dev-z", access.device_password("dev-z")):
                assert time.monotonic() < deadline, "the broker never took the enrolled device"
                time.sleep(0.2)
            dev = Client(port, "dev-z", access.device_password("dev-z"))
            assert dev.connect()
            try:  # the device's own rows, nothing else
                assert dev.publish(settings.topics.telemetry("dev-z"), b"{}") == 0
                assert dev.publish(settings.topics.telemetry("dev-y"), b"{}") == NOT_AUTHORIZED
            finally:
                dev.close()
    finally:
        end_process(broker)
