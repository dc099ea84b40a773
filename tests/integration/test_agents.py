"""The agent service against a real Mosquitto: decisions, action requests in the outbox, people in
the loop, supervision (docs/agents.md)."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from outpost.bus import Bus
from outpost.contracts import derived_id
from outpost.services.agent.service import AgentService, run
from outpost.services.agent.spec import AgentSpec
from outpost.services.registry import OutpostSettings
from tests.conftest import Collector, ServiceThread, wait_status

pytestmark = pytest.mark.integration

_seq = iter(range(1, 10**9))


def make_score(
    device: str,
    *,
    model: str = "shelf-stock",
    label: str = "low",
    confidence: float = 0.95,
    alert: bool = True,
    n: int | None = None,
) -> dict[str, Any]:
    n = next(_seq) if n is None else n
    ts = time.time_ns()
    return {
        "v": 1,
        "id": f"s-{device}-{n}",
        "ts": ts,
        "trace": f"r-{device}-{n}",
        "event": f"e-{device}-{n}",
        "device": device,
        "model": model,
        "version": "1.0.0",
        "backend": "onnxruntime-cpu",
        "score": 0.9 if alert else 0.1,
        "label": label,
        "confidence": confidence,
        "alert": alert,
        "queue_ms": 0.1,
        "compute_ms": 0.1,
        "batch": 1,
        "ingest_ns": ts,
    }


def reorder_agent(**over: Any) -> AgentSpec:
    doc: dict[str, Any] = {
        "sense": ["inference/shelf-stock/+"],
        "rules": [
            {
                "name": "low",
                "when": {"label": {"in": ["low", "empty"]}},
                "do": ["inventory.reorder"],
                "args": {"shelf": "{device}", "quantity": 5},
            }
        ],
        "may": ["inventory.reorder"],
        "escalation": {"below": 0.8, "timeout_s": 600},
        "drift": {"enabled": False},
    }
    doc.update(over)
    return AgentSpec.model_validate(doc)


def agent_settings(settings: OutpostSettings, **agents: AgentSpec) -> OutpostSettings:
    settings.agents.packs = []
    settings.agents.declared = dict(agents)
    return settings


def test_a_score_becomes_a_decision_and_an_action_request(settings: OutpostSettings, publisher: Bus) -> None:
    agent_settings(settings, restock=reorder_agent())
    t = settings.topics
    decisions = Collector(settings.mqtt, t.decisions("restock"), client_id="d-" + settings.site).start()
    actions = Collector(settings.mqtt, t.actions("inventory"), client_id="a-" + settings.site).start()
    svc: ServiceThread[AgentService] = ServiceThread(run, settings).start()
    wait_status(settings, "agents")
    score = make_score("shelf-001")
    publisher.publish(t.inference("shelf-stock", "shelf-001"), orjson.dumps([score]), qos=1)
    assert actions.wait_for(lambda c: len(c.json()) >= 1, 10)
    req = actions.json()[0]
    assert req["capability"] == "inventory.reorder"
    assert req["args"] == {"shelf": "shelf-001", "quantity": 5}
    assert req["trace"] == score["trace"]
    did = derived_id("restock", score["id"], "0")
    assert req["key"] == derived_id(did, "action")
    assert decisions.wait_for(lambda c: len(c.json()) >= 1, 10)
    d = decisions.json()[0]
    assert (d["id"], d["kind"], d["trace"]) == (did, "act", score["trace"])
    svc.stop()
