"""Shadow evaluation's pure parts (services/outpost/services/agent/replay.py): inputs folded and
decided as the service does, decisions classified with the same thresholds, the comparison, a
policy file, the log read page by page in offset order, and relative times."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from outpost.cli.log import when_ns
from outpost.contracts import derived_id
from outpost.errors import ConfigError
from outpost.services.agent.replay import Choice, Taken, classify, compare, load_spec, logged, shadow
from outpost.services.agent.spec import AgentSpec

ROOT = "outpost/v1/s1"


@dataclass(frozen=True)
class E:
    offset: int
    kind: str
    topic: str
    body: bytes
    ts: int = 0


def spec(**over: Any) -> AgentSpec:
    doc: dict[str, Any] = {
        "sense": ["events/+", "inference/shelf-stock/+"],
        "rules": [
            {
                "when": {"kind": "score", "label": "low", "feature.shelf_weight": {"lt": 15}},
                "do": ["inventory.reorder"],
                "args": {"shelf": "{device}", "kg": "{feature.shelf_weight}"},
            }
        ],
        "may": ["inventory.reorder"],
        "escalation": {"below": 0.8},
    }
    doc.update(over)
    return AgentSpec.model_validate(doc)


def event(offset: int, device: str, value: float, metric: str = "shelf_weight") -> E:
    ev = {
        "v": 1, "id": f"e{offset}", "ts": offset, "trace": f"r{offset}", "device": device, "seq": offset,
        "metric": metric, "value": value, "unit": "kg", "ingest_ns": offset, "gap": 0, "late": False,
    }  # fmt: skip
    return E(offset, "event", f"{ROOT}/events/{device}", orjson.dumps([ev]))


def score(offset: int, device: str, confidence: float, label: str = "low") -> E:
    s = {
        "v": 1, "id": f"s{offset}", "ts": offset, "trace": f"r{offset}", "event": f"e{offset}",
        "device": device, "model": "shelf-stock", "version": "1", "backend": "cpu", "score": 0.9,
        "label": label, "confidence": confidence, "alert": True, "queue_ms": 0.0, "compute_ms": 0.0,
        "batch": 1, "ingest_ns": offset,
    }  # fmt: skip
    return E(offset, "score", f"{ROOT}/inference/shelf-stock/{device}", orjson.dumps([s]))


def test_features_fold_before_deciding_and_thresholds_classify() -> None:
    entries = [
        score(1, "a", 0.95),  # no weight yet: the rule's feature test fails
        event(2, "a", 10.0),
        score(3, "a", 0.95),  # acts with kg 10
        event(4, "a", 20.0),
        score(5, "a", 0.95),  # 20 kg: nothing
        event(6, "b", 3.0),
        score(7, "b", 0.5),  # escalates: confidence under 0.8
        E(8, "dlq", f"{ROOT}/dlq/ingest", b"{}"),
    ]
    r = shadow("restock", spec(), ROOT, entries)
    assert (r.entries, r.inputs) == (7, 7)
    assert set(r.decisions) == {derived_id("restock", "s3", "0"), derived_id("restock", "s7", "0")}
    acted = r.decisions[derived_id("restock", "s3", "0")]
    assert acted.choice == Choice("act", "inventory.reorder", {"shelf": "a", "kg": 10.0})
    asked = r.decisions[derived_id("restock", "s7", "0")]
    assert asked.choice.kind == "escalate" and asked.choice.capability == "inventory.reorder"


def test_an_event_the_agent_does_not_sense_still_sets_features() -> None:
    only_scores = spec(sense=["inference/shelf-stock/+"])
    r = shadow("restock", only_scores, ROOT, [event(1, "a", 5.0), score(2, "a", 0.9)])
    assert r.inputs == 1 and len(r.decisions) == 1


def test_classify_follows_the_service() -> None:
    s = spec(escalation={"below": 0.8, "protected": ["inventory.reorder"]}, may=["inventory.reorder"])
    assert classify(s, "inventory.reorder", 0.99).kind == "escalate"  # protected
    assert classify(spec(), "inventory.reorder", 0.79).kind == "escalate"
    assert classify(spec(), "inventory.reorder", 0.8).kind == "act"
    assert classify(spec(), "ignore", 0.1) == Choice("ignore", None, {})
    assert classify(spec(), "escalate", 1.0) == Choice("escalate", None, {})


def test_compare_counts_and_lists_the_differences() -> None:
    r = shadow("restock", spec(), ROOT, [event(1, "a", 5.0), score(2, "a", 0.9), score(3, "a", 0.9)])
    d2, d3 = derived_id("restock", "s2", "0"), derived_id("restock", "s3", "0")
    args = {"shelf": "a", "kg": 5.0}
    taken = [
        Taken(d2, "s2", "r2", 0, Choice("act", "inventory.reorder", args), "x"),
        Taken(d3, "s3", "r3", 0, Choice("halt", "inventory.reorder", args), "budget"),
        Taken("other", "s-not-replayed", "r", 0, Choice("act", "inventory.reorder", args), "x"),
    ]
    report = compare(r, taken)
    assert (report["same"], report["differ"], report["only_taken"], report["only_new"]) == (1, 1, 0, 0)
    assert report["decisions_taken"] == 2  # the decision on an input outside the range is left out
    (diff,) = report["differences"]
    assert (diff["decision"], diff["taken"]["kind"], diff["would"]["kind"]) == (d3, "halt", "act")
    assert "not replayed" in report["not_replayed"] or "budgets" in report["not_replayed"]
    assert compare(r, taken, first=0)["differences"] == []


def test_policy_file_one_declaration_or_one_named(tmp_path: Path) -> None:
    doc = spec().model_dump(by_alias=True, exclude_defaults=True)
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(doc))
    assert load_spec(f) == (None, spec())
    f.write_text(yaml.safe_dump({"restock": doc}))
    assert load_spec(f) == ("restock", spec())
    f.write_text(yaml.safe_dump({**doc, "may": []}))
    with pytest.raises(ConfigError, match=r"rules.0.do|may"):
        load_spec(f)
    f.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="one agent declaration"):
        load_spec(f)
    with pytest.raises(ConfigError, match="policy file"):
        load_spec(tmp_path / "missing.yaml")


class FakeLog:
    """The replay's view of OpLog.replay, over a list (paging and kinds as OpLog does)."""

    def __init__(self, entries: list[E]) -> None:
        self.entries = entries
        self.calls = 0

    def replay(
        self,
        *,
        from_offset: int | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
        kind: str | None = None,
        limit: int = 100_000,
    ) -> list[E]:
        self.calls += 1
        out = [
            e
            for e in self.entries
            if (from_offset is None or e.offset >= from_offset)
            and (since_ns is None or e.ts >= since_ns)
            and (until_ns is None or e.ts < until_ns)
            and (kind is None or e.kind == kind)
        ]
        return out[:limit]


def test_the_log_is_read_in_pages_in_offset_order() -> None:
    entries = [E(i, ("event", "score", "decision", "dlq")[i % 4], "t", b"", ts=i) for i in range(1, 40)]
    log = FakeLog(entries)
    got = [e.offset for e in logged(log, 5, 30, page=3)]
    assert got == [i for i in range(5, 30) if i % 4 != 3]  # no dead letters
    assert log.calls > 3


def test_times_iso_relative_or_ns() -> None:
    now = 10_000 * 10**9
    assert when_ns("-30m", "--from", now) == now - 1800 * 10**9
    assert when_ns("-1h", "--from", now) == now - 3600 * 10**9
    assert when_ns("-1.5d", "--from", now) == now - int(1.5 * 86400 * 10**9)
    assert when_ns("2026-12-01T20:00:00", "--from") == when_ns("2026-12-01T20:00:00+00:00", "--from")
    assert when_ns("123", "--from") == 123
    with pytest.raises(ConfigError, match="relative"):
        when_ns("-1y", "--from")
