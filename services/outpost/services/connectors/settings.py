"""The connector gateway's settings section, ``connectors:`` in the site file
(``OUTPOST_CONNECTORS__*``): the connectors it runs (``declared``) and its own knobs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from outpost.contracts import Segment
from outpost.errors import ConfigError
from outpost.services.connectors.spec import Connector, ConnectorSpec, resolve
from outpost.settings import Section


class ConnectorsSettings(Section):
    """The connector gateway (docs/connectors.md): capabilities in, side effects out, once."""

    declared: dict[Segment, ConnectorSpec] = Field(
        default_factory=dict, description="The site's connectors, by name (docs/connectors.md)."
    )
    log_sync: Literal["OFF", "NORMAL", "FULL"] = Field(
        "FULL", description="SQLite synchronous for the outbox: FULL survives power loss, NORMAL a crash."
    )
    threads: int = Field(16, ge=1, le=256, description="Calls in flight at once, all connectors together.")
    retention_s: float = Field(
        30 * 86400.0, gt=0, description="Settled requests older than this leave the outbox."
    )

    def connectors(self) -> dict[str, Connector]:
        """Every connector this site runs, checked (a ConfigError names the field)."""
        out = {
            name: resolve(name, spec, f"connectors.declared.{name}")
            for name, spec in self.declared.items()
            if spec.enabled
        }
        offered: dict[str, str] = {}
        for c in out.values():
            for cap in c.capabilities:
                if cap in offered:
                    raise ConfigError(
                        f"connectors.declared.{c.name}.capabilities.{cap}: also offered by {offered[cap]}"
                    )
                offered[cap] = c.name
        return out
