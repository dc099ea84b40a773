"""What a connector is, as the site file declares it (``connectors.declared`` and the shipped packs):
its kind, the capabilities it offers with each one's operation and input schema, and how it is
called (timeout, retries, rate, concurrency, cost, batching, order). docs/connectors.md.

Everything is checked at start, and an error names the field
(``connectors.declared.store.capabilities.inventory.reorder.op.path``): the kind's own models
check its endpoint and operations, jsonschema checks each input schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import Field, StringConstraints, ValidationError, model_validator

from outpost.errors import ConfigError
from outpost.services.connectors.kinds import KINDS
from outpost.services.connectors.kinds.base import Kind, Strict

CapabilityName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,64}(\.[a-z0-9_-]{1,64}){1,3}$")]


class Retry(Strict):
    """Transient failures (a timeout, a 5xx, a 429, a refused connection) are tried again with
    jittered exponential backoff, or after the endpoint's Retry-After."""

    attempts: int = Field(10, ge=1, le=1000, description="Attempts before a request fails.")
    backoff_s: tuple[float, float] = Field((0.2, 30.0), description="First and longest delay.")
    max_age_s: float = Field(
        3600.0, gt=0, description="A request not done by then expires (result expired, DLQ)."
    )

    @model_validator(mode="after")
    def _order(self) -> Retry:
        lo, hi = self.backoff_s
        if not 0 < lo <= hi:
            raise ValueError("backoff_s: 0 < first <= longest")
        return self


class Rate(Strict):
    """A token bucket: ``per_s`` on average, ``burst`` at once."""

    per_s: float = Field(50.0, gt=0)
    burst: float = Field(100.0, ge=1)


class Batch(Strict):
    """Several requests in one call, where the kind can (cheaper: one call's cost for the lot)."""

    max: int = Field(1, ge=1, le=1000)
    wait_s: float = Field(0.5, ge=0, le=3600, description="Longest a partial batch waits for more.")


class CapabilitySpec(Strict):
    op: dict[str, Any] = Field(default_factory=dict, description="The kind's operation (docs/connectors.md).")
    input: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object"}, description="JSON Schema of the request's args."
    )
    rate: Rate | None = Field(None, description="A bucket of the capability's own, besides the connector's.")
    batch: Batch = Field(default_factory=Batch)
    cost: float | None = Field(None, ge=0, description="Cost of one call; default: the connector's.")
    order_by: str | None = Field(
        None,
        max_length=64,
        description="An args field: requests with the same value are carried out in arrival order.",
    )


class ConnectorSpec(Strict):
    kind: Literal["http", "postgres", "amqp", "smtp", "mqtt"]
    endpoint: dict[str, Any] = Field(default_factory=dict, description="The kind's endpoint settings.")
    capabilities: dict[CapabilityName, CapabilitySpec] = Field(min_length=1)
    timeout_s: float = Field(10.0, gt=0, le=600)
    retry: Retry = Field(default_factory=Retry)
    rate: Rate = Field(default_factory=Rate)
    concurrency: int = Field(4, ge=1, le=256, description="Calls in flight at once.")
    cost: float = Field(0.0, ge=0, description="Cost of one call (per capability: capabilities.X.cost).")
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class Capability:
    name: str
    spec: CapabilitySpec
    op: Any
    validator: Draft202012Validator
    cost: float


@dataclass(frozen=True, slots=True)
class Connector:
    """A declaration checked and resolved: its kind, endpoint and operations as the kind's models."""

    name: str
    spec: ConnectorSpec
    kind: Kind
    endpoint: Any
    capabilities: dict[str, Capability]


def resolve(name: str, spec: ConnectorSpec, where: str) -> Connector:
    """Check ``spec`` against its kind; a ConfigError names the field (``where`` is its path)."""
    kind = KINDS[spec.kind]
    try:
        endpoint = kind.endpoint_model.model_validate(spec.endpoint)
    except ValidationError as exc:
        raise ConfigError(_named(f"{where}.endpoint", exc)) from None
    caps: dict[str, Capability] = {}
    for cap, cspec in spec.capabilities.items():
        at = f"{where}.capabilities.{cap}"
        try:
            op = kind.op_model.model_validate(cspec.op)
        except ValidationError as exc:
            raise ConfigError(_named(f"{at}.op", exc)) from None
        try:
            Draft202012Validator.check_schema(cspec.input)
        except SchemaError as exc:
            raise ConfigError(f"{at}.input: not a JSON Schema: {exc.message}") from None
        if cspec.batch.max > 1 and not kind.batches:
            raise ConfigError(f"{at}.batch: a {kind.name} connector calls once per request (max 1)")
        caps[cap] = Capability(
            cap, cspec, op, Draft202012Validator(cspec.input), spec.cost if cspec.cost is None else cspec.cost
        )
    return Connector(name, spec, kind, endpoint, caps)


def _named(where: str, exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in (where, *e['loc']))}: {e['msg']}" for e in exc.errors())
