"""The example service of docs/architecture.md ("Writing a service"), run against a real broker:
what the guide teaches works, and the guide shows the file as it is."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import orjson
import pytest

from outpost.bus import Bus
from outpost.services.registry import OutpostSettings
from tests.conftest import Collector, ServiceThread, wait_status

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).parents[2] / "docs" / "examples" / "shelf_alerts.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("shelf_alerts", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def score(device: str, n: int, *, alert: bool, confidence: float = 0.9) -> dict[str, object]:
    return {
        "v": 1,
        "id": f"s-{device}-{n}",
        "ts": 1_700_000_000_000_000_000 + n,
        "trace": f"r-{device}-{n}",
        "event": f"e-{device}-{n}",
        "device": device,
        "model": "shelf",
        "version": "1.0.0",
        "backend": "onnxruntime-cpu",
        "score": 0.97 if alert else 0.02,
        "label": "empty" if alert else "ok",
        "confidence": confidence,
        "alert": alert,
        "queue_ms": 0.1,
        "compute_ms": 0.05,
        "batch": 2,
    }


def test_the_guide_shows_the_example_as_it_is() -> None:
    guide = (Path(__file__).parents[2] / "docs" / "architecture.md").read_text()
    assert EXAMPLE.read_text().strip() in guide


def test_example_service_decides_and_dead_letters(
    settings: OutpostSettings, publisher: Bus, collect: Callable[..., Collector]
) -> None:
    example = _example()
    t = settings.topics
    decisions = collect(t.decisions(example.NAME))
    dlq = collect(t.dlq(example.NAME))
    running = ServiceThread(example.run, settings).start()
    try:
        wait_status(settings, example.NAME)
        good = [score("shelf-1", 1, alert=True), score("shelf-1", 2, alert=False)]
        unsure = [score("shelf-2", 3, alert=True, confidence=0.3)]
        one_bad = [score("shelf-3", 4, alert=True), {"score": "high"}]
        publisher.publish(t.inference("shelf", "shelf-1"), orjson.dumps(good), qos=1)
        publisher.publish(t.inference("shelf", "shelf-2"), orjson.dumps(unsure), qos=1)
        publisher.publish(t.inference("shelf", "shelf-3"), orjson.dumps(one_bad), qos=1)
        publisher.publish(t.inference("shelf", "shelf-4"), b"{not json", qos=1)
        assert decisions.wait_for(lambda c: len(c.json()) == 2)
        assert dlq.wait_for(lambda c: len(c.json()) == 3)
    finally:
        svc = running.stop()
    made = sorted(decisions.json(), key=lambda d: d["args"]["device"])
    assert [(d["args"]["device"], d["trace"], d["kind"]) for d in made] == [
        ("shelf-1", "r-shelf-1-1", "act"),
        ("shelf-3", "r-shelf-3-4", "act"),
    ]
    assert all(d["v"] == 1 and d["id"] and d["agent"] == example.NAME for d in made)
    reasons = sorted((d["reason"], d["index"]) for d in dlq.json())
    assert reasons == [("missing_field", 1), ("not_json", None), ("unsure", 0)]
    c = svc.rt.metrics.counters
    assert c["messages"] == 4 and c["rejected"] == 3
    assert svc.rt.acks.acknowledged == 4  # every message acknowledged once its outputs were confirmed
