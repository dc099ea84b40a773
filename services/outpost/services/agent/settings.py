"""The agent service's settings section, ``agents:`` in the site file (``OUTPOST_AGENTS__*``): the
service's own knobs and the agents it runs (``declared``, plus the shipped ``packs``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from outpost.errors import ConfigError
from outpost.services.agent.spec import AgentName, AgentSpec, Capability
from outpost.settings import Section

PACKS_DIR = Path(__file__).parent / "packs"
"""Shipped agent packs: ``{name}.yaml``, a mapping of agent name -> declaration."""


class AgentSettings(Section):
    """The agent service (docs/agents.md): decision loops under supervision."""

    packs: list[str] = Field(
        default_factory=lambda: ["retail"],
        description="Shipped agent packs to run (services/outpost/services/agent/packs/{name}.yaml).",
    )
    declared: dict[AgentName, AgentSpec] = Field(
        default_factory=dict,
        description="The site's own agents (a pack's agent of the same name is replaced).",
    )
    routes: dict[Capability, str] = Field(
        default_factory=dict,
        description="Capability -> connector, where it is not the capability's first part.",
    )
    commit_ms: float = Field(
        2.0,
        gt=0,
        le=1000,
        description="Least time between two commits (what a flood decides meanwhile shares one), and "
        "so the longest a decision waits to be committed and published.",
    )
    log_sync: Literal["OFF", "NORMAL", "FULL"] = Field(
        "FULL", description="SQLite synchronous for agent.db: FULL survives power loss, NORMAL a crash."
    )
    resend_s: float = Field(
        30.0, gt=0, description="An action request without a result is sent again after this."
    )
    action_max_age_s: float = Field(
        86_400.0, gt=0, description="An action request with no result by then expires (counted, DLQ)."
    )
    check_s: float = Field(
        0.5, gt=0, le=60, description="How often timeouts, batches and the outbox are looked at."
    )
    retention_s: float = Field(
        30 * 86400.0,
        gt=0,
        description="Settled decisions, answered escalations and finished actions older than this go.",
    )
    report_s: float = Field(
        1.0, gt=0, le=60, description="How often each agent's state is published (control/agents/reported)."
    )

    def agents(self) -> dict[str, AgentSpec]:
        """Every agent this site runs: the packs' then ``declared`` (a ConfigError names the bad field)."""
        out: dict[str, AgentSpec] = {}
        for pack in self.packs:
            path = PACKS_DIR / f"{pack}.yaml"
            if not path.is_file():
                known = sorted(p.stem for p in PACKS_DIR.glob("*.yaml"))
                raise ConfigError(f"agents.packs: no pack {pack!r} (shipped: {', '.join(known)})")
            doc = yaml.safe_load(path.read_text())
            for name, raw in dict(doc or {}).items():
                try:
                    out[str(name)] = AgentSpec.model_validate(raw)
                except ValidationError as exc:
                    raise ConfigError(f"agents pack {pack} ({path}): {_fields(exc, str(name))}") from exc
        out.update(self.declared)
        return {name: spec for name, spec in out.items() if spec.enabled}

    def connector(self, capability: str) -> str:
        return self.routes.get(capability) or capability.split(".", 1)[0]


def _fields(exc: ValidationError, name: str) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in (name, *e['loc']))}: {e['msg']}" for e in exc.errors())
