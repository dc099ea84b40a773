"""The kinds of connector, by name: each module's ``KIND`` (docs/connectors.md)."""

from __future__ import annotations

from outpost.services.connectors.kinds import amqp, http, mqtt, postgres, smtp
from outpost.services.connectors.kinds.base import Kind

KINDS: dict[str, Kind] = {k.name: k for k in (http.KIND, postgres.KIND, amqp.KIND, smtp.KIND, mqtt.KIND)}
