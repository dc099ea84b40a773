"""``kind: amqp``: a message published to a RabbitMQ (AMQP 0-9-1) exchange with pika.

Each request is one persistent message (``delivery_mode`` 2 unless ``persistent: false``) whose
body is the request's args as JSON, published ``mandatory`` on a channel in confirm mode: the call
returns once the broker has confirmed it, so ``done`` means the broker holds it. The routing key may
name args (``shelf.{shelf}``).

Not idempotent: the broker does not deduplicate, so a request caught mid-call by a crash or a lost
confirm is published again. Its ``message_id`` is the request's key (and the ``trace`` header its
trace id), so a consumer drops the copy by message id.

A refused or lost connection, a broker that blocks publishers past the timeout, or a channel the
broker closed for a passing reason is tried again; a message the broker could not route (no queue
bound) or refused (nack), an exchange that does not exist, refused access or a bad login is final.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import pika
import pika.exceptions as pe
from pydantic import Field, field_validator, model_validator

from outpost.services.connectors.kinds import template
from outpost.services.connectors.kinds.base import Context, Kind, Outcome, Request, SecretRef, Strict
from outpost.services.connectors.kinds.pool import Pool

PERMANENT_REPLY_CODES = frozenset((403, 404, 406, 530, 540))
"""Channel or connection closed by the broker for what trying again will not change: access
refused, not found, precondition failed, not allowed, not implemented."""


class Endpoint(Strict):
    host: str = "127.0.0.1"
    port: int = Field(5672, ge=1, le=65535)
    vhost: str = "/"
    user: str = Field("guest", min_length=1, max_length=255)
    password: SecretRef | None = Field(None, description="The user's password (guest's: none needed).")
    heartbeat_s: int = Field(60, ge=0, le=3600)

    @model_validator(mode="after")
    def _login(self) -> Endpoint:
        if self.password is None and self.user != "guest":
            raise ValueError(f"user {self.user!r} needs a password: {{secret: NAME}}")
        return self


class Op(Strict):
    exchange: str = Field("", max_length=255, description="'' is the default exchange (key = queue).")
    routing_key: str = Field(max_length=255, description="{field} is the args' value.")
    persistent: bool = True
    content_type: str = "application/json"

    _key = field_validator("routing_key")(template.check)


class _Conn:
    """One BlockingConnection and its confirm-mode channel (pika's are not thread-safe: a call has
    one to itself, from the pool)."""

    def __init__(self, params: pika.ConnectionParameters) -> None:
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def fresh(self) -> bool:
        """Still open, after handling what came while it sat idle (heartbeats, a close)."""
        try:
            self.connection.process_data_events(0)
        except (pe.AMQPError, OSError):
            return False
        return bool(self.connection.is_open and self.channel.is_open)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


class AmqpClient:
    def __init__(self, endpoint: Endpoint, timeout_s: float, ctx: Context) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.resolve = ctx.resolve
        self.pool: Pool[_Conn] = Pool(self._connect, _Conn.close)

    def _connect(self) -> _Conn:
        e = self.endpoint
        password = self.resolve(e.password) if e.password is not None else "guest"  # guest's own
        params = pika.ConnectionParameters(
            host=e.host,
            port=e.port,
            virtual_host=e.vhost,
            credentials=pika.PlainCredentials(e.user, password, erase_on_connect=True),
            connection_attempts=1,
            socket_timeout=self.timeout_s,
            stack_timeout=self.timeout_s,
            blocked_connection_timeout=self.timeout_s,
            heartbeat=e.heartbeat_s,
            client_properties={"connection_name": "outpost-connectors"},
        )
        return _Conn(params)

    def call(self, op: Op, requests: Sequence[Request]) -> list[Outcome]:
        return [self._one(op, r) for r in requests]

    def _one(self, op: Op, req: Request) -> Outcome:
        try:
            routing_key = template.fill(op.routing_key, req.args)
        except template.MissingFieldError as exc:
            return Outcome(False, f"routing_key {op.routing_key!r} names what args lack: {exc}")
        props = pika.BasicProperties(
            content_type=op.content_type,
            delivery_mode=pika.DeliveryMode.Persistent if op.persistent else pika.DeliveryMode.Transient,
            message_id=req.key,
            correlation_id=req.id,
            headers={"trace": req.trace, "agent": req.agent, "capability": req.capability},
        )
        body = orjson.dumps(req.args)
        try:
            conn, reused = self.pool.take()
            if reused and not conn.fresh():
                self.pool.drop(conn)  # closed while idle: a new one, before anything is sent
                conn = self._connect()
        except KeyError as exc:
            return Outcome(False, f"no secret {exc}")
        except (pe.ProbableAuthenticationError, pe.AuthenticationError, pe.ProbableAccessDeniedError) as exc:
            return Outcome(False, f"connect: refused: {type(exc).__name__}")
        except (pe.AMQPError, OSError) as exc:
            return Outcome(False, f"connect: {exc!r}"[:500], retry=True)
        try:
            conn.channel.basic_publish(op.exchange, routing_key, body, props, mandatory=True)
        except pe.UnroutableError:
            self.pool.give(conn)
            return Outcome(False, f"unroutable: no queue bound to {op.exchange!r} for {routing_key!r}")
        except pe.NackError:
            self.pool.give(conn)
            return Outcome(False, "the broker refused it (nack)")
        except pe.ChannelClosedByBroker as exc:
            self.pool.drop(conn)
            return Outcome(
                False,
                f"channel closed by the broker: {exc.reply_code} {exc.reply_text}"[:500],
                retry=exc.reply_code not in PERMANENT_REPLY_CODES,
            )
        except pe.ConnectionClosedByBroker as exc:
            self.pool.drop(conn)
            return Outcome(
                False,
                f"connection closed by the broker: {exc.reply_code} {exc.reply_text}"[:500],
                retry=exc.reply_code not in PERMANENT_REPLY_CODES,
            )
        except (pe.AMQPError, OSError) as exc:
            self.pool.drop(conn)
            return Outcome(False, f"{type(exc).__name__}: {exc}"[:500], retry=True)
        except Exception:
            self.pool.drop(conn)
            raise
        self.pool.give(conn)
        return Outcome(True, "confirmed", {"exchange": op.exchange, "routing_key": routing_key})

    def close(self) -> None:
        self.pool.close()


def _open(endpoint: Endpoint, timeout_s: float, ctx: Context) -> AmqpClient:
    return AmqpClient(endpoint, timeout_s, ctx)


KIND = Kind("amqp", Endpoint, Op, idempotent=False, open=_open)
