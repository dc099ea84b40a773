"""The connector gateway's settings section, ``connectors:`` in the site file
(``OUTPOST_CONNECTORS__*``): the connectors it runs (``declared``, plus the shipped ``packs``) and
its own knobs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from outpost.contracts import Segment
from outpost.errors import ConfigError
from outpost.services.connectors.spec import Connector, ConnectorSpec, resolve
from outpost.settings import Section

PACKS_DIR = Path(__file__).parent / "packs"


class ConnectorsSettings(Section):
    """The connector gateway (docs/connectors.md): capabilities in, side effects out, once."""

    packs: list[str] = Field(
        default_factory=list,
        description="Shipped connector packs (services/outpost/services/connectors/packs/{name}.yaml).",
    )
    declared: dict[Segment, ConnectorSpec] = Field(
        default_factory=dict, description="The site's connectors (a pack's of the same name is replaced)."
    )
    commit_ms: float = Field(2.0, gt=0, le=1000, description="Longest a request waits to be on disk.")
    log_sync: Literal["OFF", "NORMAL", "FULL"] = Field(
        "FULL", description="SQLite synchronous for the outbox: FULL survives power loss, NORMAL a crash."
    )
    threads: int = Field(16, ge=1, le=256, description="Calls in flight at once, all connectors together.")
    retention_s: float = Field(
        30 * 86400.0, gt=0, description="Settled requests older than this leave the outbox."
    )

    def connectors(self) -> dict[str, Connector]:
        """Every connector this site runs, checked (a ConfigError names the field)."""
        specs: dict[str, tuple[ConnectorSpec, str]] = {}
        for pack in self.packs:
            path = PACKS_DIR / f"{pack}.yaml"
            if not path.is_file():
                known = sorted(p.stem for p in PACKS_DIR.glob("*.yaml"))
                raise ConfigError(
                    f"connectors.packs: no pack {pack!r} (shipped: {', '.join(known) or 'none'})"
                )
            for name, raw in dict(yaml.safe_load(path.read_text()) or {}).items():
                where = f"connectors pack {pack} ({path}): {name}"
                try:
                    specs[str(name)] = (ConnectorSpec.model_validate(raw), where)
                except ValidationError as exc:
                    raise ConfigError(f"{where}: {exc}") from None
        for name, spec in self.declared.items():
            specs[name] = (spec, f"connectors.declared.{name}")
        out = {name: resolve(name, spec, where) for name, (spec, where) in specs.items() if spec.enabled}
        offered: dict[str, str] = {}
        for c in out.values():
            for cap in c.capabilities:
                if cap in offered:
                    raise ConfigError(
                        f"connectors.declared.{c.name}.capabilities.{cap}: also offered by {offered[cap]}"
                    )
                offered[cap] = c.name
        return out
