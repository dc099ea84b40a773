"""How an agent reasons: an input in, what it asks for out. Pure: no bus, no clock of its own (time
is the input's origin time), so the service and ``outpost replay`` run the very same code.

A :class:`Policy` is the declared rules (:class:`RulePolicy`) or a plugin: a class found through the
``outpost.agents`` entry point group, built with the declaration's ``params`` (docs/agents.md,
"Plugins"). A policy keeps what it must remember (rule hits, cooldowns, a plugin's own state) in a
JSON-able :meth:`Policy.state` that the service commits with the decisions it led to, and gets back
with :meth:`Policy.restore` after a restart.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal, Protocol

from outpost.errors import ConfigError
from outpost.services.agent.spec import AgentSpec, Plugin, Rule

Kind = Literal["event", "score", "decision", "result"]
ENTRY_POINTS = "outpost.agents"


@dataclass(frozen=True, slots=True)
class Observation:
    """One sensed input, whatever its contract: the fields a rule tests and a template names."""

    kind: Kind
    id: str
    """The input's id (a score's is derived from its model and event: stable across redelivery)."""
    trace: str
    ts: int
    """Origin time, epoch ns: the policy's clock."""
    device: str
    fields: Mapping[str, Any]
    arrived_ns: int = 0
    """When the reading reached the site (0: unknown), for reading-to-decision latency."""


@dataclass(frozen=True, slots=True)
class Proposal:
    """What a policy asks for: a capability (or ``ignore`` / ``escalate``) with its input."""

    capability: str
    args: dict[str, Any] = field(default_factory=dict)
    confidence: float = 1.0
    reason: str = ""
    rule: str = ""
    batch: int = 1
    batch_wait_s: float = 30.0


class Context(Protocol):
    """What the service lets a policy read besides the input."""

    def features(self, device: str) -> Mapping[str, float]:
        """The device's last value of each metric sensed so far."""
        ...


class Policy(Protocol):
    def decide(self, obs: Observation, ctx: Context) -> list[Proposal]:
        """What to ask for on ``obs``: nothing, or steps of one task in order."""
        ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: Mapping[str, Any]) -> None: ...


_TEMPLATE = re.compile(r"\{([A-Za-z0-9_.-]+)\}")


def fill(value: Any, lookup: Callable[[str], Any]) -> Any:
    """``args`` with ``{field}`` replaced by the input's value: a string that is one placeholder
    alone keeps the value's type (``"{value}"`` -> 3.2)."""
    if isinstance(value, str):
        whole = _TEMPLATE.fullmatch(value)
        if whole:
            return lookup(whole.group(1))
        return _TEMPLATE.sub(lambda m: str(lookup(m.group(1))), value)
    if isinstance(value, dict):
        return {k: fill(v, lookup) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, lookup) for v in value]
    return value


class RulePolicy:
    """The declared rules, tried in order; the first whose tests all hold decides."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        self.names = [r.name or f"rule {i}" for i, r in enumerate(rules)]
        self._counts = ["repeats" in r.when or "{repeats}" in str(r.args) for r in rules]
        """Which rules count their matches (they test or show ``repeats``): the others keep none."""
        self._hits: dict[str, list[int]] = {}
        """'{rule}|{device}' -> origin times of its recent matches (within the rule's window)."""
        self._rest: dict[str, int] = {}
        """'{rule}|{device}' -> origin time until which the rule rests for the device."""

    def decide(self, obs: Observation, ctx: Context) -> list[Proposal]:
        feats: Mapping[str, float] | None = None

        def value(name: str) -> Any:
            nonlocal feats
            if name.startswith("feature."):
                if feats is None:
                    feats = ctx.features(obs.device)
                return feats.get(name[8:])
            if name == "kind":
                return obs.kind
            if name == "device":
                return obs.device
            if name == "trace":
                return obs.trace
            return obs.fields.get(name)

        for i, rule in enumerate(self.rules):
            key = f"{i}|{obs.device}"
            repeats_tested = self._counts[i]
            if not all(t.holds(value(f)) for f, t in rule.when.items() if f != "repeats"):
                continue
            if self._rest.get(key, -1) > obs.ts:
                continue
            repeats = 1
            if repeats_tested:  # only a rule that tests repeats keeps its matches' times
                cutoff = obs.ts - int(rule.window_s * 1e9)
                hits = self._hits.setdefault(key, [])
                while hits and hits[0] <= cutoff:
                    hits.pop(0)
                if obs.ts not in hits:  # a redelivered input is one match, not two
                    hits.append(obs.ts)
                repeats = len(hits)
                if "repeats" in rule.when and not rule.when["repeats"].holds(repeats):
                    continue
            if rule.cooldown_s:
                self._rest[key] = obs.ts + int(rule.cooldown_s * 1e9)

            def lookup(name: str, _repeats: int = repeats) -> Any:
                return _repeats if name == "repeats" else value(name)

            conf = rule.confidence
            confidence = float(conf) if not isinstance(conf, str) else lookup(conf)
            if not isinstance(confidence, int | float) or isinstance(confidence, bool):
                confidence = 1.0
            confidence = min(1.0, max(0.0, float(confidence)))
            args = fill(rule.args, lookup)
            why = f"{self.names[i]}: " + ", ".join(f"{f}={_shown(lookup(f))}" for f in rule.when)
            return [
                Proposal(cap, args, confidence, why[:2000], self.names[i], rule.batch, rule.batch_wait_s)
                for cap in rule.do
            ]
        return []

    def state(self) -> dict[str, Any]:
        return {"hits": self._hits, "rest": self._rest}

    def restore(self, state: Mapping[str, Any]) -> None:
        self._hits = {str(k): [int(t) for t in v] for k, v in dict(state.get("hits", {})).items()}
        self._rest = {str(k): int(v) for k, v in dict(state.get("rest", {})).items()}

    def forget_before(self, ts: int) -> None:
        """Drop hits older than every rule's window (called now and then: memory stays bounded)."""
        longest = max((int(r.window_s * 1e9) for r in self.rules), default=0)
        self._hits = {k: v for k, v in self._hits.items() if v and v[-1] > ts - longest}
        self._rest = {k: v for k, v in self._rest.items() if v > ts}


def _shown(value: Any) -> str:
    """A value in a reason a person reads: 3.3508000000000004 as 3.351."""
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


def plugin_class(name: str) -> type[Any]:
    """The class an ``outpost.agents`` entry point names; a clear error when none does."""
    found = [ep for ep in entry_points(group=ENTRY_POINTS) if ep.name == name]
    if not found:
        known = sorted(ep.name for ep in entry_points(group=ENTRY_POINTS))
        raise ConfigError(f"no plugin {name!r} in entry points {ENTRY_POINTS} (installed: {known or 'none'})")
    try:
        cls = found[0].load()
    except Exception as exc:  # a plugin's import error is the operator's to see, named
        raise ConfigError(f"plugin {name!r} ({found[0].value}) cannot be loaded: {exc}") from exc
    if not isinstance(cls, type) or not callable(getattr(cls, "decide", None)):
        raise ConfigError(f"plugin {name!r} ({found[0].value}) is not a class with decide(obs, ctx)")
    return cls


def make_policy(name: str, spec: AgentSpec) -> Policy:
    """The policy ``spec`` declares; a plugin that refuses its params is a ConfigError naming the
    agent's field."""
    if not isinstance(spec.reason, Plugin):
        return RulePolicy(spec.rules)
    cls = plugin_class(spec.reason.plugin)
    try:
        policy = cls(dict(spec.reason.params))
    except Exception as exc:
        raise ConfigError(
            f"agents.declared.{name}.reason.params: plugin {spec.reason.plugin!r} refused them: {exc}"
        ) from exc
    for method in ("state", "restore"):
        if not callable(getattr(policy, method, None)):
            raise ConfigError(f"plugin {spec.reason.plugin!r} has no {method}() (docs/agents.md)")
    return policy  # type: ignore[no-any-return]
