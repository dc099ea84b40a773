"""The postgres, amqp, smtp and mqtt kinds of connector through the real gateway, against real peers:
the PostgreSQL and RabbitMQ running on this machine, an aiosmtpd server the test starts, and the
test's own Mosquitto. Requests go in on ``actions/{connector}``, results are read from
``actions/{connector}/results`` and the effects are read back from the peer (docs/connectors.md).

A peer that goes away is a real one made unreachable: a TCP relay of the test's own in front of
PostgreSQL and RabbitMQ that it closes and opens again, and the aiosmtpd server stopped and started
on the same port."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import subprocess
import threading
import uuid
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import orjson
import pika
import psycopg
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from outpost.broker import Mosquitto, free_port
from outpost.bus import Bus
from outpost.contracts import header
from outpost.datadir import site_path
from outpost.services.connectors.kinds import KINDS
from outpost.services.connectors.kinds.base import Context, Outcome, Request
from outpost.services.connectors.kinds.mqtt import Endpoint as MqttEndpoint
from outpost.services.connectors.kinds.mqtt import Op as MqttOp
from outpost.services.connectors.secrets import SecretStore
from outpost.services.connectors.service import Gateway, run
from outpost.services.connectors.spec import ConnectorSpec
from outpost.services.registry import OutpostSettings
from outpost.sim.mailbox import Mailbox
from tests.conftest import OUTPOST, Collector, ServiceProcess, ServiceThread, wait_status, wait_until

pytestmark = pytest.mark.integration

PG_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
RETRY = {"attempts": 100, "backoff_s": [0.05, 0.3], "max_age_s": 300}


# --- helpers ---------------------------------------------------------------------------------------


class Relay:
    """A TCP relay from a port of its own to a peer: ``close()`` makes the peer unreachable (the
    listener and every relayed connection shut), ``open()`` reachable again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> Relay:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        return self

    def close(self) -> None:
        s, self._listener = self._listener, None
        if s is not None:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it (close alone does not)
            s.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def declare(settings: OutpostSettings, name: str, doc: dict[str, Any]) -> None:
    settings.connectors.declared = {name: ConnectorSpec.model_validate({"retry": RETRY, **doc})}


def start_gateway(settings: OutpostSettings) -> ServiceThread[Gateway]:
    g = ServiceThread(run, settings).start()
    wait_status(settings, "connectors")
    return g


def ask(bus: Bus, settings: OutpostSettings, connector: str, capability: str, key: str, **args: Any) -> None:
    """An agent's action request, as the agent service sends it."""
    doc = {**header(f"trace-{key}"), "key": key, "agent": "test", "capability": capability, "args": args}
    bus.publish(settings.topics.actions(connector), orjson.dumps(doc), qos=1)


def results(settings: OutpostSettings, connector: str) -> Collector:
    return Collector(
        settings.mqtt, settings.topics.action_results(connector), client_id=f"r-{connector}-{settings.site}"
    ).start()


def by_key(c: Collector) -> dict[str, dict[str, Any]]:
    return {d["key"]: d for d in c.json()}


def wait_results(c: Collector, *keys: str, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
    assert c.wait_for(lambda c: set(keys) <= set(by_key(c)), timeout), f"results so far: {by_key(c)}"
    return by_key(c)


def state(settings: OutpostSettings) -> Path:
    """The gateway's state folder (its secrets and outbox.db), where ``outpost secrets`` and
    ``outpost actions`` look."""
    return site_path(settings.data_dir, settings.site, "connectors")


def outbox_attempts(settings: OutpostSettings, key: str) -> int:
    """Attempts the gateway has on record for ``key`` (its outbox, read as an operator would)."""
    path = state(settings) / "outbox.db"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        row = db.execute("SELECT attempts FROM requests WHERE key = ?", (key,)).fetchone()
    return 0 if row is None else int(row[0])


# --- postgres -------------------------------------------------------------------------------------
@pytest.fixture
def table() -> Iterator[str]:
    """A table of the test's own with a unique key column (the once-only constraint)."""
    name = f"outpost_reorders_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as db:
        db.execute(
            f"CREATE TABLE {name} (key text PRIMARY KEY, shelf text NOT NULL, quantity int NOT NULL, "
            "trace text NOT NULL)"
        )
    yield name
    with psycopg.connect(PG_DSN, autocommit=True) as db:
        db.execute(f"DROP TABLE IF EXISTS {name}")


def rows(table: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(PG_DSN, autocommit=True) as db:
        return db.execute(f"SELECT key, shelf, quantity, trace FROM {table} ORDER BY key").fetchall()


def reorder_insert(table: str) -> str:
    return (
        f"INSERT INTO {table} (key, shelf, quantity, trace) "
        "VALUES (%(key)s, %(shelf)s, %(quantity)s, %(trace)s) ON CONFLICT (key) DO NOTHING RETURNING key"
    )


def test_postgres_writes_a_row_once_per_key(settings: OutpostSettings, publisher: Bus, table: str) -> None:
    declare(
        settings,
        "db",
        {
            "kind": "postgres",
            "endpoint": {"dbname": "test", "user": "postgres", "password": {"secret": "pg"}},
            "capabilities": {"inventory.reorder": {"op": {"statement": reorder_insert(table)}}},
        },
    )
    SecretStore(state(settings)).set("pg", "s3cret-pg-value")
    # An earlier attempt at k3 took effect just before a crash: the row is there, the outcome not.
    with psycopg.connect(PG_DSN, autocommit=True) as db:
        db.execute(f"INSERT INTO {table} VALUES ('k3', 'shelf-3', 3, 'trace-k3')")
    out = results(settings, "db")
    g = start_gateway(settings)
    ask(publisher, settings, "db", "inventory.reorder", "k1", shelf="shelf-1", quantity=5)
    ask(publisher, settings, "db", "inventory.reorder", "k2", shelf="shelf-2", quantity=7)
    ask(publisher, settings, "db", "inventory.reorder", "k3", shelf="shelf-3", quantity=3)
    got = wait_results(out, "k1", "k2", "k3")
    assert got["k1"]["outcome"] == "done"
    assert got["k1"]["result"] == {"rows": 1, "returned": [{"key": "k1"}]}
    assert got["k2"]["outcome"] == "done"
    assert got["k3"]["outcome"] == "duplicate"  # the unique key said it was done already
    ask(publisher, settings, "db", "inventory.reorder", "k1", shelf="shelf-1", quantity=5)  # sent again
    assert out.wait_for(lambda c: sum(d["key"] == "k1" for d in c.json()) >= 2)
    g.stop()
    out.stop()
    assert rows(table) == [
        ("k1", "shelf-1", 5, "trace-k1"),
        ("k2", "shelf-2", 7, "trace-k2"),
        ("k3", "shelf-3", 3, "trace-k3"),
    ]
    assert all(b"s3cret-pg-value" not in p for _, p in out.messages)
    listed = subprocess.run(
        [
            *OUTPOST,
            "actions",
            "list",
            "--json",
            "--data-dir",
            str(settings.data_dir),
            "--site",
            settings.site,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    states = {r["key"]: r["state"] for r in orjson.loads(listed.stdout.strip().splitlines()[-1])["requests"]}
    assert states == {"k1": "done", "k2": "done", "k3": "duplicate"}
    assert "s3cret-pg-value" not in listed.stdout
    written = [p for p in state(settings).rglob("*") if p.is_file() and not p.name.startswith("secrets.")]
    assert written and all(b"s3cret-pg-value" not in p.read_bytes() for p in written)


def test_postgres_bad_statement_fails_at_once(settings: OutpostSettings, publisher: Bus, table: str) -> None:
    declare(
        settings,
        "db",
        {
            "kind": "postgres",
            "endpoint": {"dsn": PG_DSN},
            "capabilities": {
                "inventory.reorder": {
                    "op": {
                        "statement": f"INSERT INTO {table} (key, no_such_column) VALUES (%(key)s, %(shelf)s)"
                    }
                },
                "inventory.count": {"op": {"statement": reorder_insert(table)}},
                "inventory.sneak": {"op": {"statement": f"{reorder_insert(table)}; DROP TABLE {table}"}},
            },
        },
    )
    out = results(settings, "db")
    g = start_gateway(settings)
    ask(publisher, settings, "db", "inventory.reorder", "bad1", shelf="s")
    ask(publisher, settings, "db", "inventory.count", "bad2", shelf="s", quantity="many")  # not an int
    ask(publisher, settings, "db", "inventory.count", "bad3", shelf="s")  # no quantity
    ask(publisher, settings, "db", "inventory.sneak", "bad4", shelf="s", quantity=1)  # two statements
    got = wait_results(out, "bad1", "bad2", "bad3", "bad4")
    g.stop()
    out.stop()
    assert got["bad1"]["outcome"] == "failed"
    assert "UndefinedColumn" in got["bad1"]["detail"]
    assert got["bad2"]["outcome"] == "failed"
    assert "InvalidTextRepresentation" in got["bad2"]["detail"]
    assert got["bad3"]["outcome"] == "failed"
    assert "quantity" in got["bad3"]["detail"]
    assert got["bad4"]["outcome"] == "failed"
    assert "multiple commands" in got["bad4"]["detail"]
    assert [d["attempts"] for d in got.values()] == [1, 1, 1, 1]
    assert rows(table) == []  # and the table is still there


def test_postgres_down_is_retried_then_done(settings: OutpostSettings, publisher: Bus, table: str) -> None:
    relay = Relay(5432).open()
    declare(
        settings,
        "db",
        {
            "kind": "postgres",
            "endpoint": {"port": relay.port, "dbname": "test", "user": "postgres"},
            "capabilities": {"inventory.reorder": {"op": {"statement": reorder_insert(table)}}},
            "timeout_s": 5,
        },
    )
    out = results(settings, "db")
    g = start_gateway(settings)
    try:
        ask(publisher, settings, "db", "inventory.reorder", "d1", shelf="s1", quantity=1)
        assert wait_results(out, "d1")["d1"]["outcome"] == "done"  # a pooled connection now
        relay.close()
        ask(publisher, settings, "db", "inventory.reorder", "d2", shelf="s2", quantity=2)
        assert wait_until(lambda: outbox_attempts(settings, "d2") >= 2)
        assert "d2" not in by_key(out)
        relay.open()
        got = wait_results(out, "d2")["d2"]
    finally:
        g.stop()
        out.stop()
        relay.close()
    assert got["outcome"] == "done"
    assert got["attempts"] >= 3
    assert [r[0] for r in rows(table)] == ["d1", "d2"]


# --- amqp -----------------------------------------------------------------------------------------
@pytest.fixture
def amqp_queue() -> Iterator[tuple[str, str]]:
    """An exchange and a queue of the test's own, bound for ``reorder.*``: (exchange, queue)."""
    tag = uuid.uuid4().hex[:12]
    exchange, queue = f"outpost-test-x-{tag}", f"outpost-test-q-{tag}"
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    ch = conn.channel()
    ch.exchange_declare(exchange, "topic")
    ch.queue_declare(queue)
    ch.queue_bind(queue, exchange, "reorder.*")
    yield exchange, queue
    ch.queue_delete(queue)
    ch.exchange_delete(exchange)
    conn.close()


def drain(queue: str) -> list[tuple[pika.spec.BasicProperties, bytes]]:
    """Every message in ``queue``, read back (and acknowledged)."""
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    try:
        ch = conn.channel()
        out: list[tuple[pika.spec.BasicProperties, bytes]] = []
        while True:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((props, body))
    finally:
        conn.close()


def test_amqp_publishes_confirmed_messages(
    settings: OutpostSettings, publisher: Bus, amqp_queue: tuple[str, str]
) -> None:
    exchange, queue = amqp_queue
    declare(
        settings,
        "bus",
        {
            "kind": "amqp",
            "endpoint": {"user": "guest", "password": {"secret": "rabbit"}},
            "capabilities": {
                "stock.reorder": {"op": {"exchange": exchange, "routing_key": "reorder.{shelf}"}},
                "stock.nowhere": {"op": {"exchange": exchange, "routing_key": "unbound.{shelf}"}},
            },
        },
    )
    # the operator's way: `outpost secrets set`, the value on standard input
    proc = subprocess.run(
        [*OUTPOST, "secrets", "set", "rabbit", "--data-dir", str(settings.data_dir), "--site", settings.site],
        input="guest\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = results(settings, "bus")
    g = start_gateway(settings)
    ask(publisher, settings, "bus", "stock.reorder", "a1", shelf="s1", quantity=2)
    ask(publisher, settings, "bus", "stock.nowhere", "a2", shelf="s1")
    got = wait_results(out, "a1", "a2")
    ask(publisher, settings, "bus", "stock.reorder", "a1", shelf="s1", quantity=2)  # sent again
    assert out.wait_for(lambda c: sum(d["key"] == "a1" for d in c.json()) >= 2)
    g.stop()
    out.stop()
    assert got["a1"]["outcome"] == "done"
    assert got["a1"]["result"] == {"exchange": exchange, "routing_key": "reorder.s1"}
    assert got["a2"]["outcome"] == "failed"
    assert "unroutable" in got["a2"]["detail"]
    messages = drain(queue)
    assert len(messages) == 1  # the copy was answered from the outbox, not published again
    props, body = messages[0]
    assert orjson.loads(body) == {"shelf": "s1", "quantity": 2}
    assert props.message_id == "a1"
    assert props.delivery_mode == 2
    assert props.headers is not None and props.headers["trace"] == "trace-a1"


def test_amqp_down_is_retried_then_done(
    settings: OutpostSettings, publisher: Bus, amqp_queue: tuple[str, str]
) -> None:
    exchange, queue = amqp_queue
    relay = Relay(5672)  # closed: the broker is unreachable from the start
    declare(
        settings,
        "bus",
        {
            "kind": "amqp",
            "endpoint": {"port": relay.port},
            "capabilities": {
                "stock.reorder": {"op": {"exchange": exchange, "routing_key": "reorder.{shelf}"}}
            },
            "timeout_s": 5,
        },
    )
    out = results(settings, "bus")
    g = start_gateway(settings)
    try:
        ask(publisher, settings, "bus", "stock.reorder", "b1", shelf="s1")
        assert wait_until(lambda: outbox_attempts(settings, "b1") >= 2)
        assert "b1" not in by_key(out)
        relay.open()
        got = wait_results(out, "b1")["b1"]
    finally:
        g.stop()
        out.stop()
        relay.close()
    assert got["outcome"] == "done"
    assert got["attempts"] >= 3
    assert [p.message_id for p, _ in drain(queue)] == ["b1"]


# --- smtp -----------------------------------------------------------------------------------------
class Inbox:
    """aiosmtpd handler: keeps each message; refuses recipients at nobody.example."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.sessions = 0

    async def handle_EHLO(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        self.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address.endswith("@nobody.example"):
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        content = envelope.original_content or b""
        self.messages.append((str(envelope.mail_from), list(envelope.rcpt_tos), content))
        return "250 Message accepted"

    def message_ids(self) -> list[str]:
        return [str(message_from_bytes(c)["Message-ID"]) for _, _, c in self.messages]


@pytest.fixture
def smtpd() -> Iterator[tuple[Inbox, Controller]]:
    inbox = Inbox()
    c = Controller(inbox, hostname="127.0.0.1", port=free_port())
    c.start()
    yield inbox, c
    with contextlib.suppress(Exception):
        c.stop()


MAIL_OP = {
    "from": "Shop <shop@example.com>",
    "to": "{email}",
    "subject": "Your order {order}",
    "body": "Hello {name}, order {order} is ready.",
}


def test_smtp_sends_a_batch_over_one_connection(
    settings: OutpostSettings, publisher: Bus, smtpd: tuple[Inbox, Controller]
) -> None:
    inbox, server = smtpd
    declare(
        settings,
        "mail",
        {
            "kind": "smtp",
            "endpoint": {"port": server.port},
            "capabilities": {"customer.notify": {"op": MAIL_OP, "batch": {"max": 3, "wait_s": 2}}},
            "cost": 0.03,
        },
    )
    out = results(settings, "mail")
    g = start_gateway(settings)
    ask(publisher, settings, "mail", "customer.notify", "m1", email="ann@example.com", name="Ann", order=1)
    ask(publisher, settings, "mail", "customer.notify", "m2", email="bob@nobody.example", name="Bob", order=2)
    ask(publisher, settings, "mail", "customer.notify", "m3", email="cy@example.com", name="Cy", order=3)
    got = wait_results(out, "m1", "m2", "m3")
    # an agent's batched action: one message per item
    items = [{"email": f"c{i}@example.com", "name": f"C{i}", "order": 10 + i} for i in range(3)]
    ask(publisher, settings, "mail", "customer.notify", "m4", items=items, count=3)
    got |= wait_results(out, "m4")
    g.stop()
    out.stop()
    assert [got[k]["outcome"] for k in ("m1", "m2", "m3", "m4")] == ["done", "failed", "done", "done"]
    assert "550" in got["m2"]["detail"]
    assert [got[k]["cost"] for k in ("m1", "m2", "m3")] == [0.01, 0.01, 0.01]  # one call for three
    assert inbox.sessions == 2  # m1-m3 over one SMTP connection, m4's three messages over another
    assert got["m4"]["result"] == {"sent": ["<m4.0@outpost>", "<m4.1@outpost>", "<m4.2@outpost>"]}
    assert inbox.message_ids() == [
        "<m1@outpost>",
        "<m3@outpost>",
        "<m4.0@outpost>",
        "<m4.1@outpost>",
        "<m4.2@outpost>",
    ]
    first = message_from_bytes(inbox.messages[0][2])
    assert first["Subject"] == "Your order 1"
    assert first["X-Outpost-Trace"] == "trace-m1"
    assert "Hello Ann, order 1 is ready." in first.get_payload()
    assert inbox.messages[0][1] == ["ann@example.com"]


def test_smtp_down_is_retried_then_done(settings: OutpostSettings, publisher: Bus) -> None:
    mailbox = Mailbox()  # the demo's mail server; down when the request comes
    declare(
        settings,
        "mail",
        {
            "kind": "smtp",
            "endpoint": {"port": mailbox.port},
            "capabilities": {"customer.notify": {"op": MAIL_OP}},
            "timeout_s": 5,
        },
    )
    out = results(settings, "mail")
    g = start_gateway(settings)
    try:
        ask(
            publisher, settings, "mail", "customer.notify", "n1", email="ann@example.com", name="Ann", order=1
        )
        assert wait_until(lambda: outbox_attempts(settings, "n1") >= 2)
        assert "n1" not in by_key(out)
        mailbox.start()
        got = wait_results(out, "n1")["n1"]
    finally:
        g.stop()
        out.stop()
        mailbox.stop()
    assert got["outcome"] == "done"
    assert got["attempts"] >= 3
    assert mailbox.by_message_id() == {"<n1@outpost>": 1}
    assert [(m.recipients, m.subject) for m in mailbox.messages] == [(("ann@example.com",), "Your order 1")]


# --- mqtt -----------------------------------------------------------------------------------------
def test_mqtt_sends_a_device_command(settings: OutpostSettings, publisher: Bus) -> None:
    declare(
        settings,
        "devices",
        {
            "kind": "mqtt",
            "capabilities": {"fridge.defrost": {"op": {"command": "defrost"}}},
        },
    )
    cmds = Collector(
        settings.mqtt, settings.topics.device_cmd("fridge-1", "defrost"), client_id="cmd-" + settings.site
    ).start()
    out = results(settings, "devices")
    g = start_gateway(settings)
    ask(publisher, settings, "devices", "fridge.defrost", "c1", device="fridge-1", minutes=20)
    ask(publisher, settings, "devices", "fridge.defrost", "c2", device="no/such device")
    got = wait_results(out, "c1", "c2")
    assert cmds.wait_for(lambda c: len(c.messages) >= 1)
    g.stop()
    out.stop()
    cmds.stop()
    assert got["c1"]["outcome"] == "done"
    assert got["c1"]["result"] == {"topic": settings.topics.device_cmd("fridge-1", "defrost")}
    assert got["c2"]["outcome"] == "failed"
    assert "device" in got["c2"]["detail"]
    (cmd,) = cmds.json()
    assert cmd["key"] == "c1"
    assert cmd["trace"] == "trace-c1"
    assert cmd["args"] == {"device": "fridge-1", "minutes": 20}
    assert set(cmd) == {"v", "id", "ts", "trace", "key", "args"}


def test_mqtt_broker_down_is_retried_then_done(settings: OutpostSettings, broker: Mosquitto) -> None:
    """The kind's client on its own (the gateway's intake needs the same broker): while the broker
    is down a call asks to be tried again; once it is back the command is acknowledged."""
    client = KINDS["mqtt"].open(MqttEndpoint(), 2.0, Context(lambda ref: "", settings))
    op = MqttOp(command="defrost")
    req = Request("k1", "r1", "fridge.defrost", {"device": "fridge-1"}, "trace-k1", "test", 0)
    try:
        assert wait_until(lambda: client.call(op, [req])[0].ok)
        broker.stop()
        (down,) = client.call(op, [req])
        assert not down.ok and down.retry
        broker.start()
        outcomes: list[Outcome] = []

        def acknowledged() -> bool:
            outcomes.extend(client.call(op, [req]))
            return outcomes[-1].ok

        assert wait_until(acknowledged, 60)
        assert all(o.retry for o in outcomes[:-1])
    finally:
        client.close()


def test_postgres_kill_9_mid_stream_has_each_effect_once(
    settings: OutpostSettings, broker: Mosquitto, publisher: Bus, table: str, tmp_path: Path
) -> None:
    """The gateway as a process, killed -9 while statements are in flight, then started again: the
    requests it had not settled are tried again, and the key's unique constraint makes a statement
    that had committed before the kill a duplicate, so each key is one row. Results lost with the
    process come back when a request is sent again (as the agent service does until it has one)."""
    n = 300
    site_file = tmp_path / "outpost.yaml"
    statement = (
        f"INSERT INTO {table} (key, shelf, quantity, trace) "
        "SELECT %(key)s, %(shelf)s, %(quantity)s, %(trace)s FROM pg_sleep(0.01) ON CONFLICT (key) DO NOTHING"
    )
    doc = {
        "connectors": {
            "declared": {
                "db": {
                    "kind": "postgres",
                    "endpoint": {"dsn": PG_DSN},
                    "capabilities": {"inventory.reorder": {"op": {"statement": statement}}},
                    "concurrency": 8,
                    "rate": {"per_s": 10000, "burst": 1000},
                    "retry": RETRY,
                }
            }
        }
    }
    site_file.write_bytes(orjson.dumps(doc))  # JSON is YAML
    env = {
        "OUTPOST_CONFIG": str(site_file),
        "OUTPOST_SITE": settings.site,
        "OUTPOST_DATA_DIR": str(settings.data_dir),
        "OUTPOST_MQTT__PORT": str(broker.port),
    }
    out = results(settings, "db")
    gateway = ServiceProcess("outpost.services.connectors", "connectors", env, tmp_path / "proc")
    proc = gateway.start()
    try:
        wait_status(settings, "connectors", pid=proc.pid, timeout=60)
        keys = [f"kill-{i:04d}" for i in range(n)]
        for i, key in enumerate(keys):
            ask(publisher, settings, "db", "inventory.reorder", key, shelf=f"s{i % 7}", quantity=i % 5 + 1)
        assert out.wait_for(lambda c: len(by_key(c)) >= n // 5, 60), gateway.logs()
        gateway.kill()
        settled_before = len(by_key(out))
        proc = gateway.start()
        wait_status(settings, "connectors", pid=proc.pid, timeout=60)

        def all_settled() -> bool:
            missing = [k for k in keys if k not in by_key(out)]
            for key in missing[:50]:  # the agent's re-send: the stored result, or the request anew
                i = keys.index(key)
                ask(
                    publisher, settings, "db", "inventory.reorder", key, shelf=f"s{i % 7}", quantity=i % 5 + 1
                )
            return not missing

        assert wait_until(all_settled, 120), gateway.logs()
        assert gateway.terminate() == 0
    finally:
        gateway.close()
        out.stop()
    got = by_key(out)
    assert settled_before < n  # the kill came mid-stream
    assert {d["outcome"] for d in got.values()} <= {"done", "duplicate"}
    with psycopg.connect(PG_DSN, autocommit=True) as db:
        count, distinct = db.execute(f"SELECT count(*), count(DISTINCT key) FROM {table}").fetchone() or (
            0,
            0,
        )
    assert (count, distinct) == (n, n)
