"""Agent declarations: a bad one is a clear error at start that names the field (docs/agents.md,
"Declaring an agent"); the shipped pack is valid."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from outpost.errors import ConfigError
from outpost.services.agent.policy import RulePolicy, make_policy
from outpost.services.agent.settings import AgentSettings
from outpost.services.agent.spec import AgentSpec
from outpost.services.registry import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("OUTPOST_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def agent(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "sense": ["inference/shelf-stock/+"],
        "rules": [{"when": {"label": "low"}, "do": ["inventory.reorder"]}],
        "may": ["inventory.reorder"],
    }
    doc.update(over)
    return doc


def load_error(**agents: dict[str, Any]) -> str:
    """The ConfigError the site's settings give for ``agents.declared``."""
    with pytest.raises(ConfigError) as err:
        load_settings(agents={"packs": [], "declared": agents})
    return str(err.value)


def test_a_good_declaration_loads() -> None:
    s = load_settings(agents={"packs": [], "declared": {"restock": agent()}})
    specs = s.agents.agents()
    assert list(specs) == ["restock"]
    assert isinstance(make_policy("restock", specs["restock"]), RulePolicy)


def test_the_shipped_pack_is_valid_and_builds_its_policies() -> None:
    specs = AgentSettings().agents()
    assert set(specs) == {"restock", "cold-chain", "customer-messages"}
    for name, spec in specs.items():
        make_policy(name, spec)


def test_an_unknown_key_is_named() -> None:
    msg = load_error(restock=agent(limts={"actions_per_minute": 3}))
    assert "agents.declared.restock.limts" in msg


def test_an_unknown_key_deep_in_a_rule_is_named() -> None:
    msg = load_error(
        restock=agent(rules=[{"when": {"label": "low"}, "do": ["inventory.reorder"], "arg": {}}])
    )
    assert "agents.declared.restock.rules.0.arg" in msg


def test_an_unknown_field_in_when_is_named() -> None:
    msg = load_error(restock=agent(rules=[{"when": {"colour": "red"}, "do": ["inventory.reorder"]}]))
    assert "agents.declared.restock.rules.0.when" in msg and "'colour'" in msg


def test_a_test_with_no_operator_is_an_error() -> None:
    msg = load_error(restock=agent(rules=[{"when": {"score": {}}, "do": ["inventory.reorder"]}]))
    assert "agents.declared.restock.rules.0.when.score" in msg


def test_a_rule_that_does_what_it_may_not_names_the_rule() -> None:
    msg = load_error(restock=agent(rules=[{"when": {"label": "low"}, "do": ["inventory.delete"]}]))
    assert "agents.declared.restock" in msg
    assert "rules.0.do: inventory.delete is not in may" in msg


def test_costs_and_protected_must_be_in_may() -> None:
    assert "costs: notify.staff is not in may" in load_error(r=agent(costs={"notify.staff": 1.0}))
    msg = load_error(r=agent(escalation={"protected": ["notify.staff"]}))
    assert "escalation.protected: notify.staff is not in may" in msg


def test_rules_reason_needs_rules() -> None:
    assert "rules: reason is rules but there is none" in load_error(r=agent(rules=[]))


def test_a_capability_that_is_an_endpoint_is_refused() -> None:
    msg = load_error(r=agent(may=["http://example.test/reorder"]))
    assert "agents.declared.r.may.0" in msg


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("telemetry/+", "starts with one of"),
        ("inference/shelf stock/+", "not a topic filter"),
        ("events/#/x", "# may only be the last level"),
        ("actions/inventory", "an agent senses action results"),
    ],
)
def test_a_bad_sense_filter_is_named(pattern: str, says: str) -> None:
    msg = load_error(r=agent(sense=[pattern]))
    assert "agents.declared.r.sense" in msg and says in msg


def test_good_sense_filters_pass() -> None:
    spec = AgentSpec.model_validate(
        agent(sense=["events/+", "inference/#", "decisions/+", "actions/+/results"])
    )
    assert len(spec.sense) == 4


def test_an_unknown_plugin_is_named() -> None:
    spec = AgentSpec.model_validate(agent(reason={"plugin": "no-such-plugin"}, rules=[]))
    with pytest.raises(ConfigError) as err:
        make_policy("x", spec)
    assert "no plugin 'no-such-plugin'" in str(err.value) and "cold-chain" in str(err.value)


def test_a_plugin_refusing_its_params_names_the_field() -> None:
    spec = AgentSpec.model_validate(
        agent(reason={"plugin": "cold-chain", "params": {"max_c": "warm", "bogus": 1}}, rules=[])
    )
    with pytest.raises(ConfigError) as err:
        make_policy("fridge", spec)
    msg = str(err.value)
    assert "agents.declared.fridge.reason.params" in msg and "max_c" in msg and "bogus" in msg


def test_an_unknown_pack_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        AgentSettings(packs=["nope"]).agents()
    assert "agents.packs: no pack 'nope'" in str(err.value) and "retail" in str(err.value)


def test_declared_replaces_a_pack_agent_and_enabled_false_drops_it() -> None:
    s = AgentSettings(declared={"restock": AgentSpec.model_validate(agent(enabled=False))})
    assert set(s.agents()) == {"cold-chain", "customer-messages"}


def test_a_site_file_declaration_error_names_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(
        "agents:\n  packs: []\n  declared:\n    restock:\n      sense: [inference/+/+]\n"
        "      rules: [{when: {label: low}, do: [inventory.reorder]}]\n      may: [inventory.reorder]\n"
        "      limits: {actions_per_minute: -1}\n"
    )
    monkeypatch.setenv("OUTPOST_CONFIG", str(path))
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "agents.declared.restock.limits.actions_per_minute" in str(err.value)
