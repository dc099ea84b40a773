"""Plugins Outpost ships (``outpost.agents`` entry points in pyproject.toml): reasoning that rules
cannot say. A plugin is a class built with its declaration's ``params`` that implements
:class:`outpost.services.agent.policy.Policy` (docs/agents.md, "Plugins")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from outpost.services.agent.policy import Context, Observation, Proposal


class ColdChainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_c: float = Field(8.0, description="Cabinet temperature above which food is at risk (C).")
    grace_s: float = Field(120.0, gt=0, description="How long above max_c before it is an incident.")
    min_confidence: float = Field(0.6, ge=0, le=1, description="A fridge-anomaly alert counts from here.")
    repeat: int = Field(3, ge=2, description="Incidents of one fridge within window_s that go to a person.")
    window_s: float = Field(3600.0, gt=0)
    rest_s: float = Field(600.0, ge=0, description="After an incident, the fridge's next waits this long.")


class ColdChain:
    """A display fridge in trouble: its anomaly model alerts, or its cabinet has stayed above
    ``max_c`` for ``grace_s`` (the food-safety rule: time above temperature, which no single
    reading shows). An incident alerts staff and opens a maintenance ticket; the ``repeat``-th
    incident of one fridge within ``window_s`` goes to a person instead (the ticket did not help)."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.p = ColdChainParams.model_validate(dict(params))
        self._warm_since: dict[str, int] = {}
        self._incidents: dict[str, list[int]] = {}

    def decide(self, obs: Observation, ctx: Context) -> list[Proposal]:
        p, dev = self.p, obs.device
        f = obs.fields
        why = ""
        confidence = 1.0
        if obs.kind == "event" and f.get("metric") == "temperature":
            value = f.get("value")
            if isinstance(value, int | float) and value > p.max_c:
                since = self._warm_since.setdefault(dev, obs.ts)
                if obs.ts - since >= p.grace_s * 1e9:
                    why = f"{dev} above {p.max_c:g} C for {(obs.ts - since) / 1e9:.0f} s (now {value:g} C)"
            else:
                self._warm_since.pop(dev, None)
        elif obs.kind == "score" and f.get("alert") and float(f.get("confidence", 0)) >= p.min_confidence:
            confidence = float(f.get("confidence", 1.0))
            why = f"{dev}: {f.get('model')} says {f.get('label')} ({confidence:.2f})"
        if not why:
            return []
        recent = [t for t in self._incidents.get(dev, []) if t > obs.ts - p.window_s * 1e9]
        if recent and obs.ts - recent[-1] < p.rest_s * 1e9:
            return []  # the same incident, still being handled
        recent.append(obs.ts)
        self._incidents[dev] = recent
        self._warm_since.pop(dev, None)
        args = {"device": dev, "what": why}
        if len(recent) >= p.repeat:
            return [
                Proposal(
                    "escalate",
                    args,
                    confidence,
                    f"{why}; incident {len(recent)} within {p.window_s:g} s",
                    "repeated",
                )
            ]
        return [
            Proposal("notify.staff", {**args, "urgency": "high"}, confidence, why, "incident"),
            Proposal("maintenance.ticket", {**args, "kind": "refrigeration"}, confidence, why, "incident"),
        ]

    def state(self) -> dict[str, Any]:
        return {"warm_since": self._warm_since, "incidents": self._incidents}

    def restore(self, state: Mapping[str, Any]) -> None:
        self._warm_since = {str(k): int(v) for k, v in dict(state.get("warm_since", {})).items()}
        self._incidents = {str(k): [int(t) for t in v] for k, v in dict(state.get("incidents", {})).items()}
