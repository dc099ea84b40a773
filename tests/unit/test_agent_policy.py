"""Rules (docs/agents.md, "Rules"): every operator, features, repeats, cooldown, templates that keep
their types, batches; the shipped cold-chain plugin (time above temperature, alert, repeat ->
escalate). Pure: time is the input's origin time."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from outpost.services.agent.plugins import ColdChain
from outpost.services.agent.policy import Kind, Observation, RulePolicy, fill
from outpost.services.agent.spec import Rule
from outpost.services.agent.spec import Test as FieldTest

S = 10**9


class Ctx:
    def __init__(self, feats: dict[str, dict[str, float]] | None = None) -> None:
        self.feats = feats or {}

    def features(self, device: str) -> Mapping[str, float]:
        return self.feats.get(device, {})


def obs(kind: Kind = "score", device: str = "shelf-1", ts: int = 0, n: int = 0, **fields: Any) -> Observation:
    base: dict[str, Any] = {"device": device}
    if kind == "score":
        base |= {"model": "shelf-stock", "label": "low", "score": 0.9, "confidence": 0.9, "alert": True}
    base |= fields
    return Observation(kind, f"in-{device}-{n}-{ts}", f"tr-{n}", ts, device, base)


def rule(**doc: Any) -> Rule:
    doc.setdefault("do", ["inventory.reorder"])
    return Rule.model_validate(doc)


@pytest.mark.parametrize(
    ("test", "value", "holds"),
    [
        ({"eq": "low"}, "low", True),
        ({"eq": "low"}, "high", False),
        ({"ne": "low"}, "high", True),
        ({"ne": "low"}, "low", False),
        ({"lt": 1.0}, 0.5, True),
        ({"lt": 1.0}, 1.0, False),
        ({"le": 1.0}, 1.0, True),
        ({"le": 1.0}, 1.5, False),
        ({"gt": 1.0}, 1.5, True),
        ({"gt": 1.0}, 1.0, False),
        ({"ge": 1.0}, 1.0, True),
        ({"ge": 1.0}, 0.5, False),
        ({"in": ["low", "empty"]}, "empty", True),
        ({"in": ["low", "empty"]}, "full", False),
        ({"glob": "shelf-*"}, "shelf-7", True),
        ({"glob": "shelf-*"}, "fridge-7", False),
        ({"glob": "shelf-*"}, 7, False),
        ({"gt": 0, "lt": 10}, 5, True),
        ({"gt": 0, "lt": 10}, 10, False),
        ({"lt": 10}, "5", False),  # a number test never holds for text
        ({"lt": 10}, True, False),  # nor for a boolean
        ({"eq": 1}, None, False),  # a missing field holds no test
    ],
)
def test_every_operator(test: dict[str, Any], value: Any, holds: bool) -> None:
    assert FieldTest.model_validate(test).holds(value) is holds


def test_a_scalar_in_when_means_eq_and_the_first_matching_rule_decides() -> None:
    p = RulePolicy(
        [
            rule(name="empty", when={"label": "empty"}, do=["notify.staff"]),
            rule(name="low", when={"label": "low", "confidence": {"ge": 0.5}}),
        ]
    )
    out = p.decide(obs(label="low"), Ctx())
    assert [(x.capability, x.rule) for x in out] == [("inventory.reorder", "low")]
    assert p.decide(obs(label="full"), Ctx()) == []
    assert p.decide(obs(label="empty"), Ctx())[0].capability == "notify.staff"


def test_kind_and_device_are_tested() -> None:
    p = RulePolicy([rule(when={"kind": "event", "device": {"glob": "till-*"}})])
    assert p.decide(obs("event", device="till-1", metric="sale_amount", value=3.0), Ctx())
    assert not p.decide(obs("score", device="till-1"), Ctx())
    assert not p.decide(obs("event", device="shelf-1"), Ctx())


def test_feature_fields_read_the_devices_last_values() -> None:
    p = RulePolicy([rule(when={"feature.shelf_weight": {"lt": 15.0}}, args={"w": "{feature.shelf_weight}"})])
    assert p.decide(obs(), Ctx()) == []  # no feature yet: the test does not hold
    assert p.decide(obs(n=1), Ctx({"shelf-1": {"shelf_weight": 20.0}})) == []
    out = p.decide(obs(n=2), Ctx({"shelf-1": {"shelf_weight": 9.5}}))
    assert out[0].args == {"w": 9.5}


def test_repeats_count_matches_per_device_within_the_window() -> None:
    p = RulePolicy([rule(when={"label": "low", "repeats": {"ge": 3}}, window_s=10)])
    assert p.decide(obs(ts=0 * S), Ctx()) == []
    assert p.decide(obs(ts=1 * S), Ctx()) == []
    assert p.decide(obs(device="shelf-2", ts=1 * S), Ctx()) == []  # another device counts apart
    out = p.decide(obs(ts=2 * S), Ctx())
    assert len(out) == 1 and "repeats=3" in out[0].reason
    # 20 s later the earlier hits are out of the window: counting starts again
    assert p.decide(obs(ts=22 * S), Ctx()) == []


def test_cooldown_rests_the_rule_for_that_device_only() -> None:
    p = RulePolicy([rule(when={"label": "low"}, cooldown_s=60)])
    assert p.decide(obs(ts=0), Ctx())
    assert p.decide(obs(ts=30 * S), Ctx()) == []
    assert p.decide(obs(device="shelf-2", ts=30 * S), Ctx())
    assert p.decide(obs(ts=61 * S), Ctx())


def test_rule_state_survives_a_restore() -> None:
    rules = [rule(when={"label": "low", "repeats": {"ge": 2}}, cooldown_s=60)]
    p = RulePolicy(rules)
    assert p.decide(obs(ts=0), Ctx()) == []
    q = RulePolicy(rules)
    q.restore(p.state())
    assert q.decide(obs(ts=S), Ctx())  # the second match, counted across the restore
    r = RulePolicy(rules)
    r.restore(q.state())
    assert r.decide(obs(ts=2 * S), Ctx()) == []  # ... and the cooldown too


def test_templates_keep_types_and_fill_text() -> None:
    p = RulePolicy(
        [
            rule(
                when={"kind": "event"},
                args={
                    "value": "{value}",
                    "text": "{device} at {value} {unit}",
                    "nested": {"list": ["{value}", "{repeats}", 3]},
                    "alert": "{alert}",
                    "fixed": 24,
                },
            )
        ]
    )
    out = p.decide(obs("event", device="till-1", metric="m", value=3.25, unit="EUR"), Ctx())
    assert out[0].args == {
        "value": 3.25,
        "text": "till-1 at 3.25 EUR",
        "nested": {"list": [3.25, 1, 3]},
        "alert": None,
        "fixed": 24,
    }
    assert fill({"b": "{flag}"}, {"flag": False}.get) == {"b": False}


def test_confidence_is_a_number_or_a_field_clamped_to_0_1() -> None:
    assert RulePolicy([rule(when={"label": "low"}, confidence=0.4)]).decide(obs(), Ctx())[0].confidence == 0.4
    assert RulePolicy([rule(when={"label": "low"})]).decide(obs(confidence=0.55), Ctx())[0].confidence == 0.55
    out = RulePolicy([rule(when={"label": "low"}, confidence="score")]).decide(obs(score=7.0), Ctx())
    assert out[0].confidence == 1.0
    out = RulePolicy([rule(when={"label": "low"}, confidence="label")]).decide(obs(), Ctx())
    assert out[0].confidence == 1.0  # a field that is no number: sure


def test_do_lists_the_steps_of_one_task_and_batch_travels_with_them() -> None:
    p = RulePolicy(
        [rule(when={"kind": "event"}, do=["notify.customer", "escalate", "ignore"], batch=20, batch_wait_s=5)]
    )
    out = p.decide(obs("event", device="till-1", metric="sale_amount", value=50.0), Ctx())
    assert [x.capability for x in out] == ["notify.customer", "escalate", "ignore"]
    assert {(x.batch, x.batch_wait_s) for x in out} == {(20, 5.0)}


def test_forget_before_keeps_memory_bounded() -> None:
    p = RulePolicy([rule(when={"label": "low"}, window_s=10, cooldown_s=5)])
    p.decide(obs(ts=0), Ctx())
    p.forget_before(100 * S)
    assert p.state() == {"hits": {}, "rest": {}}


# --- the cold-chain plugin -------------------------------------------------------------------------


def temp(device: str, c: float, ts: int) -> Observation:
    return obs("event", device=device, ts=ts, metric="temperature", value=c, unit="C")


def alert(device: str, ts: int, confidence: float = 0.9) -> Observation:
    return obs(device=device, ts=ts, model="fridge-anomaly", label="anomaly", confidence=confidence)


def test_cold_chain_time_above_temperature() -> None:
    c = ColdChain({"max_c": 8.0, "grace_s": 120})
    assert c.decide(temp("f1", 9.0, 0), Ctx()) == []
    assert c.decide(temp("f1", 9.5, 60 * S), Ctx()) == []
    out = c.decide(temp("f1", 9.5, 121 * S), Ctx())
    assert [x.capability for x in out] == ["notify.staff", "maintenance.ticket"]
    assert out[0].args["device"] == "f1" and "above 8 C for 121 s" in out[0].args["what"]
    assert out[0].args["urgency"] == "high" and out[1].args["kind"] == "refrigeration"


def test_cold_chain_a_cool_reading_resets_the_clock() -> None:
    c = ColdChain({"max_c": 8.0, "grace_s": 120})
    c.decide(temp("f1", 9.0, 0), Ctx())
    assert c.decide(temp("f1", 5.0, 100 * S), Ctx()) == []
    assert c.decide(temp("f1", 9.0, 130 * S), Ctx()) == []  # above again only since 130 s
    assert c.decide(temp("f1", 9.0, 251 * S), Ctx())


def test_cold_chain_alert_above_min_confidence() -> None:
    c = ColdChain({"min_confidence": 0.6})
    assert c.decide(alert("f1", 0, confidence=0.5), Ctx()) == []
    out = c.decide(alert("f2", 0, confidence=0.8), Ctx())
    assert [x.capability for x in out] == ["notify.staff", "maintenance.ticket"]
    assert out[0].confidence == 0.8


def test_cold_chain_repeated_incidents_escalate_and_rest_between() -> None:
    c = ColdChain({"repeat": 3, "window_s": 3600, "rest_s": 600})
    assert len(c.decide(alert("f1", 0), Ctx())) == 2
    assert c.decide(alert("f1", 100 * S), Ctx()) == []  # the same incident, still being handled
    assert len(c.decide(alert("f1", 700 * S), Ctx())) == 2
    out = c.decide(alert("f1", 1400 * S), Ctx())
    assert [x.capability for x in out] == ["escalate"] and "incident 3" in out[0].reason
    # its state survives a restore
    d = ColdChain({"repeat": 3, "window_s": 3600, "rest_s": 600})
    d.restore(c.state())
    assert d.decide(alert("f1", 1500 * S), Ctx()) == []
    assert d.decide(alert("f1", 2100 * S), Ctx())[0].capability == "escalate"


def test_a_redelivered_input_counts_once_for_repeats() -> None:
    """After a crash before the acknowledgement the broker sends an input again: the rule's
    committed state already holds it, so it must not count twice."""
    p = RulePolicy([rule(when={"label": "low", "repeats": {"ge": 3}})])
    first = obs(ts=0)
    assert p.decide(first, Ctx()) == []
    q = RulePolicy(p.rules)
    q.restore(p.state())
    assert q.decide(first, Ctx()) == []  # redelivered
    assert q.decide(obs(ts=S), Ctx()) == []  # only the second match
    assert q.decide(obs(ts=2 * S), Ctx())
