"""What every kind of connector is: a strict model of its endpoint settings, a strict model of one
capability's operation, and a client that carries out a batch of requests on a worker thread.

A client never raises for what an endpoint does: each request gets an :class:`Outcome` that says
whether it took effect, whether trying again may help (a timeout, a 5xx, a 429 with its
Retry-After, a connection refused) and what the endpoint answered. Only a bug raises; the gateway
then counts the batch as a transient failure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(Strict):
    """A credential by name (``outpost secrets set NAME``): never the value in the site file."""

    secret: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")


Resolve = Callable[[SecretRef], str]
"""Look a secret up by its reference (the gateway's secret store); raises KeyError when unknown."""


@dataclass(frozen=True, slots=True)
class Request:
    """One action request as the outbox holds it."""

    key: str
    id: str
    capability: str
    args: dict[str, Any]
    trace: str
    agent: str
    attempts: int
    """Attempts before this one."""


@dataclass(slots=True)
class Outcome:
    ok: bool
    detail: str = ""
    result: Any = None
    retry: bool = False
    """Trying again may help (the endpoint or the network was down, or said so)."""
    retry_after_s: float | None = None
    """The endpoint's own word on when (Retry-After)."""
    duplicate: bool = False
    """The endpoint had already done it (its idempotency key or unique constraint said so)."""
    extra: dict[str, Any] = field(default_factory=dict)


class Client(Protocol):
    def call(self, op: Any, requests: Sequence[Request]) -> list[Outcome]:
        """Carry out ``requests`` (one, or a batch the capability allows) with ``op``: one outcome
        each, in order. Runs on a worker thread; bounded by the connector's ``timeout_s``."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Context:
    """What a kind's client may use besides its own settings."""

    resolve: Resolve
    settings: Any
    """The site's settings (OutpostSettings): the mqtt kind connects to the site's broker."""


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of connector (http, postgres, amqp, smtp, mqtt): ``kinds/{name}.py`` defines ``KIND``."""

    name: str
    endpoint_model: type[Strict]
    op_model: type[Strict]
    idempotent: bool
    """The endpoint deduplicates by the key itself (a header, a unique constraint): after a crash
    mid-call the request is simply sent again and has its effect once. Otherwise a request caught
    mid-call by a crash is sent again too (at least once: docs/connectors.md)."""
    open: Callable[[Any, float, Context], Client]
    """``open(endpoint, timeout_s, ctx)``: a client for the connector's endpoint settings."""
    batches: bool = False
    """Its client carries out several requests in one call (a cheaper batch)."""
