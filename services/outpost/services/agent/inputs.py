"""Sensed messages as :class:`~outpost.services.agent.policy.Observation`: one place that knows which
fields of which contract a rule may test, for the service and for ``outpost replay`` (which reads
the same messages back from the memory service's log)."""

from __future__ import annotations

from typing import Any

import orjson

from outpost.contracts import ACTION_RESULT, DECISION, EVENT, SCORE, ActionResult, Decision, EventDict, Score
from outpost.services.agent.policy import Observation

KIND_OF_LEVEL = {"events": "event", "inference": "score", "decisions": "decision", "actions": "result"}
"""The first topic level under the site root -> the observation's kind."""


def from_event(e: EventDict) -> Observation:
    return Observation(
        "event",
        e["id"],
        e["trace"],
        e["ts"],
        e["device"],
        {"metric": e["metric"], "value": e["value"], "unit": e["unit"], "device": e["device"]},
        e["ingest_ns"],
    )


def from_score(s: Score) -> Observation:
    return Observation(
        "score",
        s.id,
        s.trace,
        s.ts,
        s.device,
        {
            "model": s.model,
            "version": s.version,
            "label": s.label,
            "score": s.score,
            "confidence": s.confidence,
            "alert": s.alert,
            "device": s.device,
        },
        s.ingest_ns,
    )


def from_decision(d: Decision) -> Observation:
    device = d.args.get("device")
    return Observation(
        "decision",
        d.id,
        d.trace,
        d.ts,
        device if isinstance(device, str) else "",
        {"agent": d.agent, "kind": d.kind, "capability": d.capability, "confidence": d.confidence, **d.args},
    )


def from_result(r: ActionResult, capability: str, agent: str, device: str) -> Observation:
    return Observation(
        "result",
        r.id,
        r.trace,
        r.ts,
        device,
        {"outcome": r.outcome, "capability": capability, "agent": agent, "cost": r.cost, "device": device},
    )


def from_logged(kind: str, body: bytes) -> list[Observation]:
    """What the memory log holds under ``kind`` (event, score, decision), as observations; what no
    longer fits its contract is skipped (it could not have been decided on either)."""
    contract: Any = {"event": EVENT, "score": SCORE, "decision": DECISION}.get(kind)
    if contract is None:
        return []
    decoded = contract.decode(body, max_bytes=len(body) + 1)
    convert: Any = {"event": from_event, "score": from_score, "decision": from_decision}[kind]
    return [convert(item) for _, item in decoded.items]


def action_result(body: bytes) -> ActionResult | None:
    decoded = ACTION_RESULT.decode(body, max_bytes=len(body) + 1)
    return decoded.items[0][1] if decoded.items else None


def loads(raw: str | bytes | None) -> Any:
    return orjson.loads(raw) if raw else None
