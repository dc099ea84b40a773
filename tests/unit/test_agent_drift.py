"""Input drift (docs/agents.md, "Drift"): a KS test of recent scores against the first ones."""

from __future__ import annotations

import random

from outpost.services.agent.drift import DriftWatch
from outpost.services.agent.spec import Drift


def watch(**over: float | int | bool) -> DriftWatch:
    return DriftWatch(Drift.model_validate({"baseline": 200, "window": 100, **over}))


def test_no_drift_on_the_same_distribution() -> None:
    rng = random.Random(7)
    w = watch()
    changes = [w.add(rng.gauss(0.3, 0.1)) for _ in range(2000)]
    assert not any(changes)
    assert not w.drifted and w.distance < 0.3 and w.view()["baseline"] == "200/200"


def test_drift_on_a_shifted_distribution_and_back() -> None:
    rng = random.Random(7)
    w = watch()
    for _ in range(300):
        w.add(rng.gauss(0.3, 0.1))
    assert not w.drifted
    changed = [w.add(rng.gauss(0.7, 0.1)) for _ in range(150)]
    assert w.drifted and changed.count(True) == 1
    assert w.distance > 0.3 and w.p < 0.01
    for _ in range(200):
        w.add(rng.gauss(0.3, 0.1))
    assert not w.drifted


def test_the_baseline_and_verdict_survive_dump_and_load() -> None:
    rng = random.Random(3)
    w = watch()
    for _ in range(300):
        w.add(rng.gauss(0.3, 0.1))
    for _ in range(150):
        w.add(rng.gauss(0.8, 0.1))
    v = watch()
    v.load(w.dump())
    assert v.drifted and v.baseline == w.baseline and list(v.recent) == list(w.recent)


def test_disabled_never_drifts() -> None:
    w = watch(enabled=False)
    for i in range(1000):
        assert not w.add(float(i))
    assert not w.drifted and w.baseline == []
