"""Supervision, enforced by the service outside the agent's code: the kill switch, budgets and a
circuit breaker per capability. Pure: the clock is passed in, so tests and a restart (the state is
JSON, committed with the decisions) see exactly what the service saw.

A **breach** (an action past ``actions_per_minute`` or ``cost_per_hour``, a task past
``steps_per_task``) halts the agent in the step that would exceed it: that step does not act, the
service records a ``halt`` decision and asks a person whether to resume. A halted agent stays
halted across restarts until ``outpost agents resume NAME`` or the person's ``resume``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from outpost.services.agent.spec import AgentSpec

State = Literal["running", "paused", "stopped"]
STATES: tuple[State, ...] = ("running", "paused", "stopped")
MINUTE_NS = 60 * 10**9
HOUR_NS = 3600 * 10**9


@dataclass(slots=True)
class BreakerState:
    failures: int = 0
    open_until: int = 0
    trial: bool = False
    """Half-open: one call is out to see whether the capability works again."""


@dataclass(slots=True)
class Verdict:
    ok: bool
    why: str = ""
    breach: str = ""
    """Which budget a refused step breaches ('' when it is the breaker)."""


@dataclass(slots=True)
class Governor:
    """One agent's supervision state."""

    spec: AgentSpec
    desired: State = "running"
    halted: str = ""
    """Why a breach halted the agent ('' while it is not halted)."""
    halted_ns: int = 0
    actions: deque[int] = field(default_factory=deque)
    """Origin-independent wall times (ns) of the action requests of the last minute."""
    costs: deque[tuple[int, float]] = field(default_factory=deque)
    breakers: dict[str, BreakerState] = field(default_factory=dict)
    breaches: int = 0

    @property
    def state(self) -> str:
        """running, paused, stopped, or halted (a breach; cleared by resume)."""
        if self.desired != "running":
            return self.desired
        return "halted" if self.halted else "running"

    @property
    def acting(self) -> bool:
        return self.state == "running"

    def _trim(self, now: int) -> None:
        while self.actions and self.actions[0] <= now - MINUTE_NS:
            self.actions.popleft()
        while self.costs and self.costs[0][0] <= now - HOUR_NS:
            self.costs.popleft()

    def used(self, now: int) -> dict[str, float]:
        self._trim(now)
        return {"actions_last_minute": len(self.actions), "cost_last_hour": self.cost_last_hour}

    @property
    def cost_last_hour(self) -> float:
        return round(sum(c for _, c in self.costs), 6)

    def check(self, capability: str, steps_before: int, now: int) -> Verdict:
        """May this step ask for ``capability`` now (``steps_before`` steps of its task taken)?"""
        lim = self.spec.limits
        self._trim(now)
        if steps_before >= lim.steps_per_task:
            return Verdict(
                False, f"task took {steps_before} steps (limit {lim.steps_per_task})", "steps_per_task"
            )
        if len(self.actions) + 1 > lim.actions_per_minute:
            return Verdict(
                False,
                f"{len(self.actions)} actions in the last minute (limit {lim.actions_per_minute})",
                "actions_per_minute",
            )
        cost = self.spec.costs.get(capability, 0.0)
        if cost and self.cost_last_hour + cost > lim.cost_per_hour:
            return Verdict(
                False,
                f"cost {self.cost_last_hour:g} in the last hour + {cost:g} > {lim.cost_per_hour:g}",
                "cost_per_hour",
            )
        b = self.breakers.get(capability)
        if b is not None and b.failures >= self.spec.breaker.failures and (now < b.open_until or b.trial):
            return Verdict(False, f"{capability} failed {b.failures} times in a row (breaker open)")
        return Verdict(True)

    def acted(self, capability: str, now: int) -> None:
        self.actions.append(now)
        cost = self.spec.costs.get(capability, 0.0)
        if cost:
            self.costs.append((now, cost))
        b = self.breakers.get(capability)
        if b is not None and b.failures >= self.spec.breaker.failures:
            b.trial = True  # the one call of the half-open breaker

    def result(self, capability: str, ok: bool, now: int, cost: float | None = None) -> bool:
        """An action's result; True when it opened the breaker."""
        b = self.breakers.setdefault(capability, BreakerState())
        b.trial = False
        if ok:
            b.failures, b.open_until = 0, 0
            return False
        b.failures += 1
        if b.failures >= self.spec.breaker.failures:
            b.open_until = now + int(self.spec.breaker.cool_s * 1e9)
            return b.failures == self.spec.breaker.failures
        return False

    def open_breakers(self, now: int) -> dict[str, float]:
        """Capability -> seconds until its trial call (0: a trial may go now)."""
        return {
            cap: max(0.0, (b.open_until - now) / 1e9)
            for cap, b in sorted(self.breakers.items())
            if b.failures >= self.spec.breaker.failures
        }

    def halt(self, why: str, now: int) -> None:
        self.halted, self.halted_ns = why, now
        self.breaches += 1

    def resume(self) -> None:
        self.halted, self.halted_ns = "", 0

    # --- durable form ----------------------------------------------------------------------------
    def dump(self) -> dict[str, Any]:
        return {
            "desired": self.desired,
            "halted": self.halted,
            "halted_ns": self.halted_ns,
            "actions": list(self.actions),
            "costs": [list(c) for c in self.costs],
            "breakers": {k: [b.failures, b.open_until, b.trial] for k, b in self.breakers.items()},
            "breaches": self.breaches,
        }

    def load(self, doc: dict[str, Any]) -> None:
        desired = doc.get("desired", "running")
        self.desired = desired if desired in STATES else "running"
        self.halted = str(doc.get("halted", ""))
        self.halted_ns = int(doc.get("halted_ns", 0))
        self.actions = deque(int(t) for t in doc.get("actions", ()))
        self.costs = deque((int(t), float(c)) for t, c in doc.get("costs", ()))
        self.breakers = {
            str(k): BreakerState(int(v[0]), int(v[1]), bool(v[2]))
            for k, v in dict(doc.get("breakers", {})).items()
        }
        self.breaches = int(doc.get("breaches", 0))


def desired_state(control: dict[str, Any], agent: str) -> State:
    """An agent's desired state from the control document (``control/agents/desired``, retained):
    the stricter of the site-wide ``all`` and the agent's own entry."""
    rank = {"running": 0, "paused": 1, "stopped": 2}
    wanted = [control.get("all", "running"), dict(control.get("agents", {})).get(agent, "running")]
    states = [s for s in wanted if s in rank]
    return max(states, key=lambda s: rank[s], default="running")


def command(control: dict[str, Any], verb: str, agent: str | None) -> dict[str, Any]:
    """The control document after ``outpost agents stop|pause|resume NAME|--all``. Resume clears a
    halt too: the service clears it for every message that asks for running and is newer than it."""
    state = {"stop": "stopped", "pause": "paused", "resume": "running"}[verb]
    doc = {"all": control.get("all", "running"), "agents": dict(control.get("agents", {}))}
    if agent is None:
        doc["all"] = state
        if state == "running":
            doc["agents"] = {}
    elif state == "running":  # while all are held, the agent stays held with them
        doc["agents"].pop(agent, None)
    else:
        doc["agents"][agent] = state
    doc["resume"] = [agent] if (state == "running" and agent) else (["*"] if state == "running" else [])
    return doc
