"""What an agent is, as the site file declares it (``agents.declared`` and the shipped packs).

An agent **senses** topics (patterns under the site's root over events, scores, other agents'
decisions and action results), **reasons** with rules (or a plugin found through the
``outpost.agents`` entry point group), may ask for the **capabilities** it lists (never an
endpoint: the connector gateway maps a capability to a connector), and runs under **limits** the
service enforces outside its code: budgets, a circuit breaker per capability, thresholds below which
a person decides (docs/agents.md).

Every model here is strict: an unknown key, a wrong type or a rule that asks for a capability the
agent may not use is an error at start, naming the field (``agents.declared.restock.rules.0.do``).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from outpost.contracts import Segment

AgentName = Segment
Capability = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,64}(\.[a-z0-9_-]{1,64}){1,3}$")]
"""``connector.verb`` (``inventory.reorder``, ``notify.staff``): the first part names the connector
that offers it unless the site routes it elsewhere (``agents.routes``)."""

SENSED_KINDS = ("events", "inference", "decisions", "actions")
"""The first level of a sensed pattern: what arrives there (event, score, decision, action result)."""

_FILTER_LEVEL = re.compile(r"^(\+|#|[A-Za-z0-9_-]{1,64})$")

Scalar = str | int | float | bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Test(_Strict):
    """One comparison of a field's value; every operator given must hold."""

    eq: Scalar | None = None
    ne: Scalar | None = None
    lt: float | None = None
    le: float | None = None
    gt: float | None = None
    ge: float | None = None
    in_: list[Scalar] | None = Field(None, alias="in")
    glob: str | None = Field(None, description="fnmatch pattern for a text field (shelf-*).")

    @model_validator(mode="after")
    def _one_at_least(self) -> Test:
        if not self.model_fields_set:
            raise ValueError("a test needs at least one of eq, ne, lt, le, gt, ge, in, glob")
        return self

    def holds(self, value: Any) -> bool:
        if value is None:
            return False
        if self.eq is not None and value != self.eq:
            return False
        if self.ne is not None and value == self.ne:
            return False
        if self.in_ is not None and value not in self.in_:
            return False
        if self.glob is not None and not (isinstance(value, str) and fnmatch.fnmatchcase(value, self.glob)):
            return False
        if any(b is not None for b in (self.lt, self.le, self.gt, self.ge)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                return False
            if self.lt is not None and not value < self.lt:
                return False
            if self.le is not None and not value <= self.le:
                return False
            if self.gt is not None and not value > self.gt:
                return False
            if self.ge is not None and not value >= self.ge:
                return False
        return True


FIELD_RE = re.compile(
    r"^(kind|device|model|label|score|confidence|alert|metric|value|unit|agent|"
    r"capability|outcome|repeats|feature\.[A-Za-z0-9_-]{1,64})$"
)


class Rule(_Strict):
    """``when`` every test holds for an input, ask for ``do`` with ``args``.

    Fields a test may name: of the input (``kind``: event/score/decision/result; ``device``,
    ``model``, ``label``, ``score``, ``confidence``, ``alert`` of a score; ``metric``, ``value``,
    ``unit`` of an event; ``agent``, ``capability`` of a decision; ``outcome`` of an action result),
    ``feature.{metric}`` (the device's last value of that metric, from the events the agent senses)
    and ``repeats`` (how often this rule matched this device within ``window_s``, this time included).
    A scalar stands for ``{eq: scalar}``."""

    name: str = Field("", max_length=64, description="Shown in reasons; default: the rule's index.")
    when: dict[str, Test] = Field(min_length=1)
    do: list[Capability | Literal["ignore", "escalate"]] = Field(
        min_length=1,
        max_length=16,
        description="Capabilities asked for in order (one task, a step each); ignore: nothing; "
        "escalate: ask a person with the input's context.",
    )
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="The capability's input; strings may name input fields: '{device}', '{value}'.",
    )
    confidence: str | float = Field(
        "confidence",
        description="The decision's confidence: a number, or an input field (a score's confidence).",
    )
    window_s: float = Field(600.0, gt=0, description="How far back ``repeats`` counts.")
    cooldown_s: float = Field(
        0.0, ge=0, description="After it acts for a device, the rule rests this long for that device."
    )
    batch: int = Field(
        1, ge=1, le=1000, description="Collect this many asks into one action (customer messages)."
    )
    batch_wait_s: float = Field(30.0, gt=0, description="Longest a partial batch waits.")

    @field_validator("when", mode="before")
    @classmethod
    def _scalars(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        out: dict[str, Any] = {}
        for key, test in value.items():
            if not isinstance(key, str) or not FIELD_RE.match(key):
                raise ValueError(f"unknown field {key!r} in when (see docs/agents.md, 'Rules')")
            out[key] = test if isinstance(test, dict) else {"eq": test}
        return out


class Limits(_Strict):
    """Budgets the service enforces; a breach halts the agent within the step that would exceed it."""

    actions_per_minute: int = Field(30, ge=0, description="Action requests in any 60 s.")
    cost_per_hour: float = Field(10.0, ge=0, description="Declared cost of the actions in any hour.")
    steps_per_task: int = Field(8, ge=1, description="Decisions one task may take (loops stop here).")


class Breaker(_Strict):
    """A capability that keeps failing is not asked for again until it cools down."""

    failures: int = Field(3, ge=1, description="Failed results in a row that open the breaker.")
    cool_s: float = Field(60.0, gt=0, description="How long it stays open before one trial.")


class Escalation(_Strict):
    """When a person decides, and what happens when nobody answers."""

    below: float = Field(0.7, ge=0, le=1, description="Decisions less confident than this ask a person.")
    protected: list[Capability] = Field(
        default_factory=list, description="Capabilities that always ask a person first."
    )
    timeout_s: float = Field(900.0, gt=0, description="How long a question waits for its answer.")
    on_timeout: Literal["approve", "reject"] = Field(
        "reject", description="The safe default taken when nobody answered in time."
    )


class Drift(_Strict):
    """A two-sample Kolmogorov-Smirnov test (scipy) of recent input scores against a baseline."""

    enabled: bool = True
    baseline: int = Field(500, ge=20, description="Scores the baseline holds (the first seen).")
    window: int = Field(200, ge=20, description="Recent scores compared with it.")
    max_distance: float = Field(0.3, gt=0, le=1, description="KS statistic past which inputs drift.")
    min_p: float = Field(0.01, gt=0, lt=1, description="...and only when the p-value is below this.")


class Plugin(_Strict):
    """Custom reasoning: an ``outpost.agents`` entry point and the parameters it is built with."""

    plugin: str = Field(min_length=1, max_length=128)
    params: dict[str, Any] = Field(default_factory=dict)


class AgentSpec(_Strict):
    """One agent (docs/agents.md)."""

    description: str = Field("", max_length=500)
    sense: list[str] = Field(min_length=1, description="Topic filters under the site root.")
    reason: Literal["rules"] | Plugin = "rules"
    rules: list[Rule] = Field(default_factory=list)
    may: list[Capability] = Field(default_factory=list, description="Capabilities it may ask for.")
    costs: dict[Capability, float] = Field(
        default_factory=dict, description="Declared cost of one call per capability (default 0)."
    )
    limits: Limits = Field(default_factory=Limits)
    breaker: Breaker = Field(default_factory=Breaker)
    escalation: Escalation = Field(default_factory=Escalation)
    drift: Drift = Field(default_factory=Drift)
    dry_run: bool = Field(False, description="Decide and log, never act.")
    enabled: bool = True

    @field_validator("sense")
    @classmethod
    def _filters(cls, value: list[str]) -> list[str]:
        for pattern in value:
            levels = pattern.split("/")
            if levels[0] not in SENSED_KINDS:
                raise ValueError(
                    f"{pattern!r}: a sensed pattern starts with one of {', '.join(SENSED_KINDS)}"
                )
            if not all(_FILTER_LEVEL.match(level) for level in levels):
                raise ValueError(f"{pattern!r} is not a topic filter of ids, + and #")
            if "#" in levels[:-1]:
                raise ValueError(f"{pattern!r}: # may only be the last level")
            if levels[0] == "actions" and levels[-1] not in ("results", "#"):
                raise ValueError(f"{pattern!r}: an agent senses action results (actions/+/results)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AgentSpec:
        if self.reason == "rules" and not self.rules:
            raise ValueError("rules: reason is rules but there is none")
        may = set(self.may)
        for i, rule in enumerate(self.rules):
            for cap in rule.do:
                if cap not in ("ignore", "escalate") and cap not in may:
                    raise ValueError(f"rules.{i}.do: {cap} is not in may ({sorted(may) or 'empty'})")
        for name, where in ((self.costs, "costs"), (self.escalation.protected, "escalation.protected")):
            for cap in name:
                if cap not in may:
                    raise ValueError(f"{where}: {cap} is not in may")
        return self
