"""Pure pieces of overload handling (issue 14): the log's repeat filter, the telemetry topic
parser used for bad topics, the decoder's bounded work on a huge bad batch, grouped dead letters."""

from __future__ import annotations

import logging

import orjson
import pytest

from outpost.contracts import READING, DeadLetter, dead_letter
from outpost.errors import TopicError
from outpost.log import RepeatFilter
from outpost.services.ingest.service import unit_hint
from outpost.topics import Topics


def _record(msg: str, level: int = logging.ERROR, exc: BaseException | None = None) -> logging.LogRecord:
    info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord("outpost.x", level, __file__, 1, msg, (), info)


def test_repeat_filter_shows_one_per_kind_and_counts_the_rest() -> None:
    f = RepeatFilter(every_s=3600)
    assert f.filter(_record("handler failed", exc=ValueError()))
    assert not any(f.filter(_record("handler failed", exc=ValueError())) for _ in range(99))
    assert f.filter(_record("handler failed", exc=KeyError()))  # another kind
    assert f.filter(_record("other"))
    assert f.filter(_record("chatty", level=logging.INFO))
    assert f.filter(_record("chatty", level=logging.INFO))  # below WARNING: never limited
    assert f.suppressed == 99


def test_repeat_filter_says_how_many_it_suppressed() -> None:
    f = RepeatFilter(every_s=0.0)
    first = _record("x")
    assert f.filter(first) and not hasattr(first, "suppressed")
    f.every_s = 3600
    for _ in range(5):
        f.filter(_record("x"))
    f.every_s = 0.0
    shown = _record("x")
    assert f.filter(shown)
    assert shown.suppressed == 5  # type: ignore[attr-defined]


def test_telemetry_device() -> None:
    t = Topics(prefix="outpost", site="s1")
    assert t.telemetry_device("outpost/v1/s1/dev/d1/telemetry") == "d1"
    assert t.telemetry_device("outpost/v1/s1/dev/d1/status") is None
    assert t.telemetry_device("outpost/v1/s1/dev/d1/cmd/open") is None
    with pytest.raises(TopicError, match="2 levels"):
        t.telemetry_device("outpost/v1/s1/dev/a/b/telemetry")
    with pytest.raises(TopicError):
        t.telemetry_device("outpost/v1/s1/dev/a*/telemetry")
    with pytest.raises(TopicError):
        t.telemetry_device("outpost/v1/other/dev/d1/telemetry")


def test_a_huge_batch_of_empty_objects_is_refused_whole() -> None:
    raw = b"[" + b",".join([b"{}"] * 300_000) + b"]"
    d = READING.decode(raw, max_bytes=2_000_000, max_items=10_000, lenient=True)
    assert d.items == []
    assert [(r.reason, r.index) for r in d.rejects] == [("batch_too_large", None)]


def test_grouped_dead_letter_fits_the_contract() -> None:
    entry = orjson.loads(
        dead_letter(
            stage="ingest",
            reason="bad_identifier",
            detail="3 items",
            topic="t",
            payload=b"[1,2,3]",
            index=10,
            count=3,
            items=[{"index": i, "detail": "device"} for i in (10, 11, 12)],
            truncated=True,
        )
    )
    DeadLetter.model_validate(entry)
    assert entry["count"] == 3 and entry["truncated"] is True
    single = orjson.loads(dead_letter(stage="s", reason="r", detail="d", topic="t", payload=b"x"))
    assert "count" not in single and DeadLetter.model_validate(single).count == 1


@pytest.mark.parametrize(
    ("factor", "word"), [(1, "seconds"), (1000, "milliseconds"), (10**6, "microseconds")]
)
def test_unit_hint_names_the_likely_unit(factor: int, word: str) -> None:
    import time

    assert word in unit_hint(int(time.time()) * factor)
    assert unit_hint(5).endswith("nanoseconds")
