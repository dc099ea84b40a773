"""Envelope helpers: deterministic reading ids, DLQ entries (truncation), the pydantic contracts."""

from __future__ import annotations

import base64

import orjson
import pytest
from pydantic import ValidationError

from outpost.contracts import (
    DLQ_PAYLOAD_MAX,
    READING,
    SCHEMA_VERSION,
    DeadLetter,
    Event,
    Reading,
    dead_letter,
    new_id,
    reading_id,
)


def test_reading_id_is_deterministic() -> None:
    assert reading_id("s1", "d1", 7) == reading_id("s1", "d1", 7)
    assert len(reading_id("s1", "d1", 7)) == 24
    assert int(reading_id("s1", "d1", 7), 16) >= 0  # hex


@pytest.mark.parametrize(
    "other",
    [("s2", "d1", 7), ("s1", "d2", 7), ("s1", "d1", 8), ("s1", "d1", 70), ("s1", "d17", 0)],
)
def test_reading_id_differs_when_any_part_differs(other: tuple[str, str, int]) -> None:
    assert reading_id("s1", "d1", 7) != reading_id(*other)


def test_reading_ids_do_not_collide() -> None:
    ids = {reading_id("s1", f"d{d}", seq) for d in range(20) for seq in range(500)}
    assert len(ids) == 20 * 500


def test_new_id_is_unique() -> None:
    assert len({new_id() for _ in range(1000)}) == 1000


def test_dead_letter_small_payload() -> None:
    raw = b"\xff\x00not json"
    entry = orjson.loads(
        dead_letter(
            stage="ingest", reason="not_json", detail="bad", topic="a/b", payload=raw, trace="t1", index=3
        )
    )
    DeadLetter.model_validate(entry)
    assert entry["v"] == SCHEMA_VERSION
    assert entry["stage"] == "ingest"
    assert entry["reason"] == "not_json"
    assert entry["trace"] == "t1"
    assert entry["index"] == 3
    assert base64.b64decode(entry["payload_b64"]) == raw
    assert entry["payload_len"] == len(raw)
    assert entry["truncated"] is False


def test_dead_letter_without_trace_uses_its_own_id() -> None:
    entry = orjson.loads(dead_letter(stage="ingest", reason="x", detail="", topic="t", payload=b""))
    assert entry["trace"] == entry["id"]
    assert entry["index"] is None
    assert entry["payload_b64"] == ""


@pytest.mark.parametrize("size", [DLQ_PAYLOAD_MAX, DLQ_PAYLOAD_MAX + 1, 3 * DLQ_PAYLOAD_MAX])
def test_dead_letter_truncation(size: int) -> None:
    raw = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    entry = orjson.loads(dead_letter(stage="ingest", reason="too_large", detail="", topic="t", payload=raw))
    kept = base64.b64decode(entry["payload_b64"])
    assert entry["payload_len"] == size
    assert entry["truncated"] is (size > DLQ_PAYLOAD_MAX)
    assert kept == raw[:DLQ_PAYLOAD_MAX]


def test_dead_letter_caps_detail_and_topic() -> None:
    entry = orjson.loads(
        dead_letter(stage="ingest", reason="x", detail="d" * 5000, topic="t" * 5000, payload=b"p")
    )
    assert len(entry["detail"]) == 1000
    assert len(entry["topic"]) == 512


def _reading(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "device": "d1",
        "seq": 1,
        "ts": 1_700_000_000_000_000_000,
        "metric": "temperature",
        "value": 21.5,
        "unit": "C",
    }
    base.update(kw)
    return base


def test_reading_contract_accepts_a_good_reading() -> None:
    assert READING.validate_python(_reading()) == _reading()
    assert Reading.model_validate(_reading()).device == "d1"
    assert READING.validate_python(_reading(value=3))["value"] == 3  # an int is a fine float


@pytest.mark.parametrize(
    "bad",
    [
        {"seq": "1"},
        {"seq": True},
        {"seq": -1},
        {"seq": 2**63},
        {"ts": 1.5},
        {"value": True},
        {"value": "1.5"},
        {"value": float("nan")},
        {"value": float("inf")},
        {"device": "a/b"},
        {"device": "x" * 65},
        {"metric": ""},
        {"unit": ""},
        {"unit": "u" * 17},
        {"extra": 1},
    ],
)
def test_reading_contract_refuses(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        READING.validate_python(_reading(**bad))
    with pytest.raises(ValidationError):
        Reading.model_validate(_reading(**bad))


def test_event_model_matches_what_ingest_emits() -> None:
    e = Event(
        id=reading_id("s", "d", 1),
        ts=1,
        trace=reading_id("s", "d", 1),
        device="d",
        seq=1,
        metric="m",
        value=1.0,
        unit="C",
        ingest_ns=2,
    )
    assert e.v == 1
    assert e.gap == 0
    assert e.late is False
