"""What a simulator run is asked to do: one validated model shared by the CLI, the API and tests.

A pydantic model rather than loose arguments because it crosses a process boundary (it is pickled
to every publisher process) and because a bad value should fail before any connection is made.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from outpost.settings import CoreSettings
from outpost.sim.badinput import ALL_KINDS, BadKind
from outpost.sim.scenario import DEFAULT_ANOMALY_RATE
from outpost.topics import SEGMENT_RE


def _default_processes() -> int:
    return os.cpu_count() or 1


class SimOptions(BaseModel):
    """Options of ``outpost sim`` (each field is a CLI option of the same name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker: str = Field(default="127.0.0.1:1883", description="Broker as HOST:PORT.")
    site: str = Field(default="site1", description="Site id, the third topic level.")
    prefix: str = Field(default="outpost", description="Topic prefix.")
    devices: int = Field(default=50, ge=1, le=100_000, description="Number of simulated devices.")
    scenario: Literal["retail", "generic"] = Field(default="retail", description="Which fleet to simulate.")
    rate: float = Field(
        default=1000.0,
        ge=0,
        description="Total items (readings and bad payloads) offered per second; 0 = flat out.",
    )
    duration: float = Field(
        default=10.0, gt=0, description="Seconds to run (the run also stops at `readings`)."
    )
    readings: int = Field(default=0, ge=0, description="Stop after this many items in total; 0 = no limit.")
    seed: int = Field(default=0, description="Seed: the same seed gives every device the same readings.")
    bad_ratio: float = Field(default=0.0, ge=0, le=1, description="Fraction of items that are bad payloads.")
    bad_kinds: tuple[BadKind, ...] = Field(
        default=ALL_KINDS, min_length=1, description="Bad kinds to draw from."
    )
    batch: int = Field(default=1, ge=1, le=10_000, description="Readings per message (1 = bare objects).")
    qos: Literal[0, 1] = Field(default=0, description="QoS of telemetry publishes.")
    processes: int = Field(
        default_factory=_default_processes, ge=1, le=256, description="Publisher processes."
    )
    churn: float = Field(
        default=1.0, ge=0, description="Abrupt disconnects per device per minute, on average."
    )
    anomaly_rate: float = Field(
        default=DEFAULT_ANOMALY_RATE, ge=0, le=1, description="Chance per step of an anomaly."
    )
    seq_start: int = Field(default=0, ge=0, lt=2**62, description="First seq of every device.")
    keepalive: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive of each device connection.")
    username: str | None = Field(default=None, description="Broker user name.")
    password: SecretStr | None = Field(default=None, description="Broker password (never printed).")
    credentials: Path | None = Field(
        default=None,
        description="A site's broker credentials folder (outpost.access): each device connects as "
        "itself with the password derived from the site key, in place of username/password.",
    )

    @field_validator("site", "prefix")
    @classmethod
    def _segment(cls, v: str) -> str:
        if SEGMENT_RE.fullmatch(v) is None:
            raise ValueError("must match [A-Za-z0-9_-]{1,64}")
        return v

    @field_validator("broker")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError("must be HOST:PORT with a port 1-65535, e.g. 127.0.0.1:1883")
        return v

    @property
    def host(self) -> str:
        return self.broker.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.broker.rpartition(":")[2])

    @classmethod
    def from_settings(cls, settings: CoreSettings, **overrides: object) -> SimOptions:
        """Options aimed at the broker, site, prefix and credentials of ``settings``."""
        base: dict[str, object] = {
            "broker": f"{settings.mqtt.host}:{settings.mqtt.port}",
            "site": settings.site,
            "prefix": settings.prefix,
            "username": settings.mqtt.username,
            "password": settings.mqtt.password,
        }
        base.update(overrides)
        return cls.model_validate(base)
