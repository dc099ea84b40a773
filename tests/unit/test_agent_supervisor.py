"""Supervision outside the agent's code (docs/agents.md, "Supervision"): budgets per minute and
hour, steps per task, the breaker (open, half-open, closed), the control document's desired state
and the CLI's commands. Pure: the clock is passed in."""

from __future__ import annotations

from typing import Any

from outpost.services.agent.spec import AgentSpec
from outpost.services.agent.supervisor import Governor, command, desired_state

S = 10**9
T0 = 1_000_000 * S


def spec(**over: Any) -> AgentSpec:
    doc: dict[str, Any] = {
        "sense": ["inference/+/+"],
        "rules": [{"when": {"label": "low"}, "do": ["inventory.reorder"]}],
        "may": ["inventory.reorder", "notify.staff"],
        "costs": {"inventory.reorder": 1.0},
    }
    doc.update(over)
    return AgentSpec.model_validate(doc)


def test_actions_per_minute() -> None:
    g = Governor(spec(limits={"actions_per_minute": 3, "cost_per_hour": 1000}))
    for i in range(3):
        assert g.check("notify.staff", 0, T0 + i).ok
        g.acted("notify.staff", T0 + i)
    v = g.check("notify.staff", 0, T0 + 10)
    assert (v.ok, v.breach) == (False, "actions_per_minute") and "limit 3" in v.why
    assert g.used(T0 + 10)["actions_last_minute"] == 3
    # a minute after the first, one slot is free again
    assert g.check("notify.staff", 0, T0 + 60 * S).ok
    assert g.used(T0 + 60 * S + 2)["actions_last_minute"] == 0


def test_cost_per_hour() -> None:
    g = Governor(spec(limits={"actions_per_minute": 1000, "cost_per_hour": 2.5}))
    for i in range(2):
        g.acted("inventory.reorder", T0 + i * 120 * S)
    assert g.cost_last_hour == 2.0
    v = g.check("inventory.reorder", 0, T0 + 300 * S)
    assert (v.ok, v.breach) == (False, "cost_per_hour")
    assert g.check("notify.staff", 0, T0 + 300 * S).ok  # a free capability is not refused
    assert g.check("inventory.reorder", 0, T0 + 3601 * S).ok  # the first cost is an hour old


def test_steps_per_task() -> None:
    g = Governor(spec(limits={"steps_per_task": 2}))
    assert g.check("notify.staff", 1, T0).ok
    v = g.check("notify.staff", 2, T0)
    assert (v.ok, v.breach) == (False, "steps_per_task")


def test_zero_actions_per_minute_refuses_every_action() -> None:
    v = Governor(spec(limits={"actions_per_minute": 0})).check("notify.staff", 0, T0)
    assert v.breach == "actions_per_minute"


def test_breaker_opens_half_opens_and_closes() -> None:
    g = Governor(spec(breaker={"failures": 2, "cool_s": 60}))
    cap = "notify.staff"
    assert g.result(cap, False, T0) is False
    assert g.check(cap, 0, T0).ok
    assert g.result(cap, False, T0 + S) is True  # the second failure in a row opens it
    v = g.check(cap, 0, T0 + 2 * S)
    assert not v.ok and v.breach == "" and "breaker open" in v.why
    assert g.open_breakers(T0 + 2 * S) == {cap: 59.0}
    assert g.check("inventory.reorder", 0, T0 + 2 * S).ok  # per capability
    # cooled down: one trial call (half-open), no second while it is out
    assert g.check(cap, 0, T0 + 62 * S).ok
    g.acted(cap, T0 + 62 * S)
    assert not g.check(cap, 0, T0 + 63 * S).ok
    # the trial fails: open again for cool_s (not counted as newly opened)
    assert g.result(cap, False, T0 + 64 * S) is False
    assert not g.check(cap, 0, T0 + 65 * S).ok
    assert g.check(cap, 0, T0 + 125 * S).ok
    g.acted(cap, T0 + 125 * S)
    # the trial works: closed
    g.result(cap, True, T0 + 126 * S)
    assert g.open_breakers(T0 + 126 * S) == {}
    assert g.check(cap, 0, T0 + 127 * S).ok


def test_a_success_resets_the_failure_count() -> None:
    g = Governor(spec(breaker={"failures": 2}))
    g.result("notify.staff", False, T0)
    g.result("notify.staff", True, T0)
    assert g.result("notify.staff", False, T0) is False
    assert g.check("notify.staff", 0, T0).ok


def test_halt_resume_and_states() -> None:
    g = Governor(spec())
    assert (g.state, g.acting) == ("running", True)
    g.halt("actions_per_minute: too many", T0)
    assert (g.state, g.acting, g.breaches) == ("halted", False, 1)
    g.desired = "stopped"
    assert g.state == "stopped"  # the operator's switch shows over a halt
    g.desired = "running"
    g.resume()
    assert (g.state, g.acting, g.halted_ns) == ("running", True, 0)
    g.desired = "paused"
    assert (g.state, g.acting) == ("paused", False)


def test_governor_state_survives_dump_and_load() -> None:
    g = Governor(spec(breaker={"failures": 1}))
    g.acted("inventory.reorder", T0)
    g.result("notify.staff", False, T0)
    g.halt("why", T0)
    g.desired = "paused"
    h = Governor(spec(breaker={"failures": 1}))
    h.load(g.dump())
    assert h.dump() == g.dump()
    assert h.cost_last_hour == 1.0 and h.open_breakers(T0) == g.open_breakers(T0)
    h.load({"desired": "bogus"})
    assert h.desired == "running"


def test_desired_state_is_the_stricter_of_all_and_the_agent() -> None:
    assert desired_state({}, "a") == "running"
    assert desired_state({"all": "paused"}, "a") == "paused"
    assert desired_state({"agents": {"a": "stopped"}}, "a") == "stopped"
    assert desired_state({"agents": {"a": "stopped"}}, "b") == "running"
    assert desired_state({"all": "stopped", "agents": {"a": "paused"}}, "a") == "stopped"
    assert desired_state({"all": "paused", "agents": {"a": "stopped"}}, "a") == "stopped"
    assert desired_state({"all": "bogus", "agents": {"a": "paused"}}, "a") == "paused"


def test_command_builds_the_control_document() -> None:
    doc = command({}, "stop", "restock")
    assert doc == {"all": "running", "agents": {"restock": "stopped"}, "resume": []}
    doc = command(doc, "pause", "cold-chain")
    assert doc["agents"] == {"restock": "stopped", "cold-chain": "paused"}
    doc = command(doc, "resume", "restock")
    assert doc["agents"] == {"cold-chain": "paused"} and doc["resume"] == ["restock"]
    doc = command(doc, "stop", None)
    assert doc["all"] == "stopped" and doc["resume"] == []
    assert desired_state(doc, "anyone") == "stopped"
    doc = command(doc, "resume", None)
    assert doc == {"all": "running", "agents": {}, "resume": ["*"]}
