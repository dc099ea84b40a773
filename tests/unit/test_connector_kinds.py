"""The kinds' own models, checked at start: a bad endpoint or operation of a postgres, amqp, smtp or
mqtt connector is a ConfigError that names the field (docs/connectors.md)."""

from __future__ import annotations

from typing import Any

import pytest

from outpost.errors import ConfigError
from outpost.services.connectors.kinds import KINDS, template
from outpost.services.connectors.kinds.postgres import Endpoint as PgEndpoint
from outpost.services.connectors.kinds.postgres import placeholders
from outpost.services.connectors.kinds.smtp import message_id
from outpost.services.connectors.settings import ConnectorsSettings

GOOD: dict[str, dict[str, Any]] = {
    "postgres": {
        "endpoint": {"dbname": "shop", "user": "outpost", "password": {"secret": "pg"}},
        "op": {"statement": "INSERT INTO r (key, n) VALUES (%(key)s, %(n)s) ON CONFLICT (key) DO NOTHING"},
    },
    "amqp": {
        "endpoint": {"host": "127.0.0.1", "user": "outpost", "password": {"secret": "rabbit"}},
        "op": {"exchange": "stock", "routing_key": "reorder.{shelf}"},
    },
    "smtp": {
        "endpoint": {"port": 2525, "starttls": True, "user": "shop", "password": {"secret": "mail"}},
        "op": {"from": "shop@example.com", "to": "{email}", "subject": "Order {order}", "body": "Hi {name}"},
    },
    "mqtt": {"endpoint": {}, "op": {"command": "defrost"}},
}


def check(kind: str, *, endpoint: dict[str, Any] | None = None, op: dict[str, Any] | None = None) -> None:
    good = GOOD[kind]
    doc = {
        "kind": kind,
        "endpoint": good["endpoint"] if endpoint is None else endpoint,
        "capabilities": {"shop.act": {"op": good["op"] if op is None else op}},
    }
    ConnectorsSettings.model_validate({"declared": {"c": doc}}).connectors()


def refused(kind: str, **kw: Any) -> str:
    with pytest.raises(ConfigError) as err:
        check(kind, **kw)
    return str(err.value)


def test_every_kind_is_registered_and_its_examples_pass() -> None:
    assert set(KINDS) == {"http", "postgres", "amqp", "smtp", "mqtt"}
    for kind in GOOD:
        check(kind)
    assert KINDS["postgres"].idempotent
    assert not KINDS["amqp"].idempotent and not KINDS["smtp"].idempotent and not KINDS["mqtt"].idempotent
    assert KINDS["smtp"].batches and not KINDS["postgres"].batches


@pytest.mark.parametrize(
    ("statement", "why"),
    [
        ("DELETE FROM r", "no %(name)s placeholder"),
        ("INSERT INTO r VALUES (%s)", "only %(name)s placeholders"),
        ("SELECT '%' || %(a)s", "only %(name)s placeholders"),
        ("SELECT %(a)d", "only %(name)s placeholders"),
    ],
)
def test_postgres_statements_are_parameterised_only(statement: str, why: str) -> None:
    msg = refused("postgres", op={"statement": statement})
    assert "connectors.declared.c.capabilities.shop.act.op.statement" in msg
    assert why in msg


def test_postgres_placeholders_and_literal_percent() -> None:
    assert placeholders("SELECT 'x%%' , %(a)s, %(key)s WHERE b = %(a)s") == ["a", "key", "a"]


def test_postgres_endpoint_needs_a_database_and_no_password_in_the_dsn() -> None:
    assert "connectors.declared.c.endpoint" in refused("postgres", endpoint={"host": "127.0.0.1"})
    msg = refused("postgres", endpoint={"dsn": "postgresql://u:hunter2@127.0.0.1/shop"})
    assert "connectors.declared.c.endpoint.dsn" in msg and "name a secret" in msg
    assert "hunter2" not in msg
    msg = refused("postgres", endpoint={"dbname": "shop", "password": "hunter2"})
    assert "connectors.declared.c.endpoint.password" in msg
    assert "hunter2" not in PgEndpoint(dsn="host=127.0.0.1 dbname=shop", user="u").conninfo()


def test_amqp_op_and_endpoint_are_checked() -> None:
    msg = refused("amqp", op={"exchange": "stock"})
    assert "op.routing_key" in msg
    msg = refused("amqp", op={"exchange": "stock", "routing_key": "r.{shelf.__class__}"})
    assert "op.routing_key" in msg and "only {field}" in msg
    assert "endpoint.port" in refused("amqp", endpoint={"port": 0})
    assert "endpoint.passwd" in refused("amqp", endpoint={"passwd": "x"})
    assert "needs a password" in refused("amqp", endpoint={"user": "outpost"})


def test_smtp_op_and_endpoint_are_checked() -> None:
    op = dict(GOOD["smtp"]["op"])
    assert "op.from" in refused("smtp", op={**op, "from": "not an address"})
    assert "op.subject" in refused("smtp", op={**op, "subject": "{0}"})
    del op["to"]
    assert "op.to" in refused("smtp", op=op)
    msg = refused("smtp", endpoint={"user": "shop"})
    assert "connectors.declared.c.endpoint" in msg and "user and password go together" in msg


def test_mqtt_command_is_one_topic_level() -> None:
    assert "op.command" in refused("mqtt", op={"command": "a/b"})
    assert "op.command" in refused("mqtt", op={"command": "#"})


def test_a_batch_only_where_the_kind_batches() -> None:
    doc = {
        "kind": "postgres",
        "endpoint": GOOD["postgres"]["endpoint"],
        "capabilities": {"shop.act": {"op": GOOD["postgres"]["op"], "batch": {"max": 10}}},
    }
    with pytest.raises(ConfigError, match=r"capabilities\.shop\.act\.batch"):
        ConnectorsSettings.model_validate({"declared": {"c": doc}}).connectors()


def test_templates_fill_plain_fields_only() -> None:
    assert template.fill("r.{shelf}.{n}", {"shelf": "s1", "n": 3}) == "r.s1.3"
    assert template.fill("{{literal}}", {}) == "{literal}"
    with pytest.raises(template.MissingFieldError, match="shelf"):
        template.fill("r.{shelf}", {})
    for bad in ("{a.b}", "{a[0]}", "{a!r}", "{a:>5}", "{}"):
        with pytest.raises(ValueError, match="only"):
            template.check(bad)


def test_message_ids_follow_the_key() -> None:
    assert message_id("k1") == "<k1@outpost>"
    assert message_id("k1", 2) == "<k1.2@outpost>"
    odd = message_id("a key <with> @ odd chars")
    assert odd == message_id("a key <with> @ odd chars")
    assert " " not in odd and odd.count("@") == 1
