"""Message contracts (outpost.contracts): the envelope header, deterministic ids, dead letters
(truncation), the pydantic models against what the services produce, and ``Contract.decode``'s
fast and slow paths (every refusal with its reason from DECODE_REASONS)."""

from __future__ import annotations

import base64
import hashlib
import re
import time
import typing
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from outpost.contracts import (
    CONTRACTS,
    DEAD_LETTER,
    DECODE_REASONS,
    DLQ_PAYLOAD_MAX,
    ESCALATION,
    EVENT,
    METRICS,
    READING,
    SCHEMA_VERSION,
    SCORE,
    STATUS,
    Contract,
    DeadLetter,
    Decoded,
    Envelope,
    Event,
    EventDict,
    MetricsBatch,
    Reading,
    ReadingDict,
    Score,
    dead_letter,
    derived_id,
    encode,
    event_dict,
    header,
    item_bytes,
    new_id,
    reading_id,
    reading_id_prefix,
)
from outpost.metrics import Metrics
from tests.conftest import make_event


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


# --- header() and encode() ------------------------------------------------------------------------
def test_header_fields() -> None:
    before = time.time_ns()
    h = header("tr-1")
    after = time.time_ns()
    assert list(h) == ["v", "id", "ts", "trace"]
    assert h["v"] == SCHEMA_VERSION == 1
    assert re.fullmatch(r"[0-9a-f]{32}", h["id"])
    assert before <= h["ts"] <= after
    assert h["trace"] == "tr-1"
    Envelope.model_validate(h)
    assert header()["trace"] == ""
    assert header()["id"] != header()["id"]


def test_header_keeps_a_given_id_and_ts() -> None:
    assert header("t", id="abc", ts=5) == {"v": 1, "id": "abc", "ts": 5, "trace": "t"}
    assert header(ts=0)["ts"] == 0  # zero is a timestamp, not "unset"


def test_encode_writes_the_header_then_the_body() -> None:
    doc = orjson.loads(encode("tr", device="d1", value=1.5))
    assert list(doc) == ["v", "id", "ts", "trace", "device", "value"]
    assert doc["trace"] == "tr"
    assert doc["device"] == "d1"
    assert doc["value"] == 1.5
    # a body field may replace a header field (a deterministic id for a redelivery)
    assert orjson.loads(encode("tr", id="fixed"))["id"] == "fixed"


def test_derived_id_is_deterministic_and_depends_on_every_part() -> None:
    assert derived_id("m1", "e1") == derived_id("m1", "e1")
    assert len(derived_id("m1", "e1")) == 24
    assert derived_id("m1", "e1") != derived_id("m1", "e2")
    assert derived_id("m1", "e1") != derived_id("m", "1e1")
    assert derived_id("a/b", "c") == derived_id("a", "b/c")  # parts are joined by '/': ids are segments


def test_reading_id_epoch_changes_the_id_and_epoch_zero_is_the_old_id() -> None:
    assert reading_id("s1", "d1", 7, 0) == reading_id("s1", "d1", 7)
    assert reading_id("s1", "d1", 7, 1) != reading_id("s1", "d1", 7)
    assert reading_id("s1", "d1", 7, 1) != reading_id("s1", "d1", 7, 2)
    seeded = hashlib.blake2b(reading_id_prefix("s1", "d1", 3), digest_size=12)
    seeded.update(b"%d" % 7)
    assert seeded.hexdigest() == reading_id("s1", "d1", 7, 3)  # what ingest's hot loop does


def test_dead_letter_fits_its_model_and_records_truncation() -> None:
    big = b"x" * (DLQ_PAYLOAD_MAX + 10)
    entry = orjson.loads(
        dead_letter(stage="ingest", reason="too_large", detail="big", topic="t", payload=big, index=2)
    )
    m = DeadLetter.model_validate(entry)
    assert m.truncated is True
    assert m.payload_len == len(big)
    assert m.index == 2
    assert DEAD_LETTER.decode(orjson.dumps(entry), max_bytes=1 << 20).items


# --- item_bytes: one bad item of a batch, re-encoded for its dead letter ----------------------------
def test_item_bytes_keeps_what_orjson_would_change() -> None:
    raw = b"whole message"
    assert item_bytes({"value": float("nan")}, raw) == b'{"value":NaN}'
    assert item_bytes({"value": float("-inf")}, raw) == b'{"value":-Infinity}'
    assert item_bytes({"seq": 2**70}, raw) == b'{"seq":1180591620717411303424}'
    assert item_bytes({"unit": "°C"}, raw) == '{"unit":"°C"}'.encode()
    assert item_bytes([1, "a"], raw) == b'[1,"a"]'


def test_item_bytes_falls_back_to_the_whole_message() -> None:
    raw = b"whole message"
    deep: list[object] = []
    node = deep
    for _ in range(5000):
        child: list[object] = []
        node.append(child)
        node = child
    assert item_bytes(deep, raw) == raw  # too deep to encode
    assert item_bytes({"unit": "\udfff"}, raw) == raw  # a lone surrogate is not UTF-8
    assert item_bytes({"x": object()}, raw) == raw


# --- the models against what the services produce ---------------------------------------------------
def _keys(td: type) -> set[str]:
    return set(typing.get_type_hints(td))


def test_typed_dicts_have_the_models_fields() -> None:
    assert set(Reading.model_fields) == _keys(ReadingDict)
    assert set(Event.model_fields) == _keys(EventDict)


def _ingest_event(seq: int = 1) -> dict[str, object]:
    """An event with exactly the keys ingest's hot loop writes (outpost.services.ingest.service)."""
    eid = reading_id("s1", "d1", seq)
    return {
        "v": SCHEMA_VERSION,
        "id": eid,
        "ts": 1_700_000_000_000_000_000,
        "trace": eid,
        "device": "d1",
        "seq": seq,
        "metric": "temperature",
        "value": 21.5,
        "unit": "C",
        "ingest_ns": 1_700_000_000_000_000_123,
        "gap": 0,
        "late": False,
    }


@pytest.mark.parametrize(
    "make",
    [
        _ingest_event,
        lambda: make_event("d1", 3, "shelf_weight", 4.25),
        lambda: event_dict("d1", 3, "temperature", 4.2, "C", ts=10**18, id="run7-d1-3", trace="run7-d1-3"),
    ],
)
def test_event_as_ingest_and_the_tests_build_it_fits_both_decoders(
    make: Callable[[], dict[str, Any]],
) -> None:
    ev = make()
    assert set(ev) == set(Event.model_fields)
    assert Event.model_validate(ev).model_dump() == ev
    assert EVENT.validate_python(ev) == ev
    one = EVENT.decode(orjson.dumps(ev), max_bytes=1 << 20)
    assert (one.items, one.rejects, one.batch) == ([(0, ev)], [], False)
    many = EVENT.decode(orjson.dumps([ev, ev]), max_bytes=1 << 20)
    assert (many.items, many.rejects, many.batch) == ([(0, ev), (1, ev)], [], True)


def _inference_score() -> dict[str, object]:
    """A score with exactly the keys inference publishes (services/outpost/services/inference/service.py)."""
    return {
        "v": SCHEMA_VERSION,
        "id": derived_id("m1", "e1"),
        "ts": 1_700_000_000_000_000_000,
        "trace": "e1",
        "event": "e1",
        "device": "d1",
        "model": "m1",
        "version": "3",
        "backend": "onnxruntime-cpu",
        "score": 0.25,
        "label": "normal",
        "confidence": 0.75,
        "alert": False,
        "queue_ms": 0.5,
        "compute_ms": 0.1,
        "batch": 4,
        "ingest_ns": 1_700_000_000_000_000_000,
    }


def test_score_as_inference_builds_it_fits() -> None:
    sc = _inference_score()
    assert set(sc) == set(Score.model_fields)
    assert Score.model_validate(sc).model_dump() == sc
    out = SCORE.decode(orjson.dumps([sc, {**sc, "score": 1.5}]), max_bytes=1 << 20)
    assert [i for i, _ in out.items] == [0]
    assert out.items[0][1].model_dump() == sc
    assert [(r.reason, r.index) for r in out.rejects] == [("out_of_range", 1)]


def test_metrics_snapshot_as_the_kit_publishes_it_fits() -> None:
    m = Metrics("ingest")
    m.inc("messages", 3)
    m.histogram("e2e").record_ns(1_500_000)
    snap = m.snapshot()
    snap.update(header())
    snap["state"] = {"turns_waiting": 0, "publishes_waiting": 0, "worker_queued": 0}
    assert MetricsBatch.model_validate(snap).counters == {"messages": 3}
    assert METRICS.decode(orjson.dumps(snap), max_bytes=1 << 20).items


@pytest.mark.parametrize(
    "extra",
    [
        {"health": "ok", "problems": []},
        {"health": "degraded", "problems": ["no model"]},
        {"reason": "connection lost"},
    ],
)
def test_status_as_the_kit_publishes_it_fits(extra: dict[str, object]) -> None:
    body = header()
    body.update(service="ingest", state="online", version="0.1.0", config_hash="ab12", pid=1, started_ns=5)
    body.update(extra)
    assert STATUS.decode(orjson.dumps(body), max_bytes=1 << 20).rejects == []


def test_every_contract_is_in_the_table_once() -> None:
    assert len({id(c) for c, _ in CONTRACTS.values()}) == len(CONTRACTS)
    for name, (contract, topic) in CONTRACTS.items():
        assert topic.startswith("outpost/v1/{site}/") or name == "memory-response"
        assert contract.model.__doc__, f"{name}: its docstring is the docs' description"


# --- Contract.decode --------------------------------------------------------------------------------
MAX = 1 << 20


def _r(**kw: object) -> dict[str, object]:
    return _reading(**kw)


def _decode(raw: bytes, contract: Contract[Any] = READING, **kw: Any) -> Decoded[Any]:
    kw.setdefault("max_bytes", MAX)
    out = contract.decode(raw, **kw)
    assert {r.reason for r in out.rejects} <= set(DECODE_REASONS)
    return out


def _reasons(out: Decoded[Any]) -> list[tuple[str, int | None]]:
    return [(r.reason, r.index) for r in out.rejects]


@pytest.fixture
def slow_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Records each payload READING and EVENT decode on their slow path."""
    calls: list[bytes] = []
    for contract in (READING, EVENT):
        real = contract._decode_slow

        def spy(raw: bytes, *args: Any, _real: Any = real) -> Any:
            calls.append(raw)
            return _real(raw, *args)

        monkeypatch.setattr(contract, "_decode_slow", spy)
    return calls


def test_decode_one_reading_takes_the_fast_path(slow_calls: list[bytes]) -> None:
    out = _decode(orjson.dumps(_r()))
    assert out.items == [(0, _r())]
    assert out.rejects == []
    assert out.batch is False
    assert type(out.items[0][1]) is dict
    assert slow_calls == []


def test_decode_a_batch_takes_the_fast_path(slow_calls: list[bytes]) -> None:
    batch = [_r(seq=i) for i in range(100)]
    out = _decode(orjson.dumps(batch))
    assert out.batch is True
    assert out.items == list(enumerate(batch))
    assert out.rejects == []
    assert slow_calls == []


def test_a_batch_of_one_is_still_a_batch() -> None:
    out = _decode(orjson.dumps([_r()]))
    assert out.batch is True
    assert out.items == [(0, _r())]


def test_one_bad_item_of_a_batch_is_refused_alone(slow_calls: list[bytes]) -> None:
    batch = [_r(seq=0), _r(seq=-1), _r(seq=2), _r(device="a/b"), _r(seq=4)]
    raw = orjson.dumps(batch)
    out = _decode(raw)
    assert slow_calls == [raw]
    assert out.batch is True
    assert out.items == [(0, batch[0]), (2, batch[2]), (4, batch[4])]
    assert _reasons(out) == [("out_of_range", 1), ("bad_identifier", 3)]
    assert out.rejects[0].item == batch[1]
    assert out.rejects[0].detail.startswith("seq: ")
    assert out.rejects[1].detail.startswith("device: ")


@pytest.mark.parametrize(
    ("bad", "reason", "field"),
    [
        ({"seq": "1"}, "wrong_type", "seq"),
        ({"seq": True}, "wrong_type", "seq"),
        ({"seq": 1.0}, "wrong_type", "seq"),
        ({"seq": -1}, "out_of_range", "seq"),
        ({"seq": 2**63}, "out_of_range", "seq"),
        ({"seq": 2**64 - 1}, "out_of_range", "seq"),
        ({"ts": 1.5}, "wrong_type", "ts"),
        ({"value": True}, "wrong_type", "value"),
        ({"value": "1.5"}, "wrong_type", "value"),
        ({"value": None}, "wrong_type", "value"),
        ({"device": "a/b"}, "bad_identifier", "device"),
        ({"device": "+"}, "bad_identifier", "device"),
        ({"device": "x" * 65}, "bad_identifier", "device"),
        ({"device": "a\x00b"}, "bad_identifier", "device"),
        ({"device": 5}, "wrong_type", "device"),
        ({"metric": ""}, "bad_identifier", "metric"),
        ({"unit": ""}, "invalid", "unit"),
        ({"unit": "u" * 17}, "invalid", "unit"),
        ({"extra": 1}, "extra_field", "extra"),
    ],
)
def test_each_refusal_has_a_precise_reason(bad: dict[str, object], reason: str, field: str) -> None:
    single = _decode(orjson.dumps(_r(**bad)))
    assert _reasons(single) == [(reason, None)]
    assert single.rejects[0].detail.startswith(f"{field}: ")
    assert single.items == []
    batch = _decode(orjson.dumps([_r(), _r(**bad)]))
    assert _reasons(batch) == [(reason, 1)]
    assert batch.items == [(0, _r())]


@pytest.mark.parametrize("field", ["device", "seq", "ts", "metric", "value", "unit"])
def test_missing_field(field: str) -> None:
    item = _r()
    del item[field]
    out = _decode(orjson.dumps(item))
    assert _reasons(out) == [("missing_field", None)]
    assert out.rejects[0].detail.startswith(f"{field}: ")


@pytest.mark.parametrize("digits", ["18446744073709551616", "123456789012345678901234567890"])
@pytest.mark.parametrize("sign", ["", "-"])
def test_integer_beyond_64_bits(digits: str, sign: str) -> None:
    raw = orjson.dumps(_r(seq=0)).replace(b'"seq":0', f'"seq":{sign}{digits}'.encode())
    for lenient in (False, True):
        out = _decode(raw, lenient=lenient)
        assert _reasons(out) == [("out_of_range", None)]
        assert "seq" in out.rejects[0].detail


def test_empty_batch() -> None:
    out = _decode(b"[]")
    assert out.batch is True
    assert _reasons(out) == [("empty_batch", None)]


def test_batch_too_large() -> None:
    raw = orjson.dumps([_r(seq=i) for i in range(11)])
    assert _reasons(_decode(raw, max_items=11)) == []
    out = _decode(raw, max_items=10)
    assert _reasons(out) == [("batch_too_large", None)]
    assert out.items == []
    assert "11 items > limit 10" in out.rejects[0].detail


def test_too_large_is_refused_before_parsing(slow_calls: list[bytes]) -> None:
    raw = orjson.dumps(_r())
    assert _decode(raw, max_bytes=len(raw)).items  # exactly the limit is fine
    out = _decode(raw, max_bytes=len(raw) - 1)
    assert _reasons(out) == [("too_large", None)]
    assert out.items == []
    assert slow_calls == []
    assert _reasons(_decode(b"\xff" * 100, max_bytes=10)) == [("too_large", None)]


@pytest.mark.parametrize(("lenient", "reason"), [(False, "not_json"), (True, "not_utf8")])
def test_not_utf8(lenient: bool, reason: str) -> None:
    raw = orjson.dumps(_r()).replace(b'"C"', b'"\xff\xfe"')
    out = _decode(raw, lenient=lenient)
    assert _reasons(out) == [(reason, None)]
    assert "invalid UTF-8 at byte" in out.rejects[0].detail


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"])
def test_non_finite_values_lenient_or_not(literal: bytes) -> None:
    raw = orjson.dumps(_r(value=0)).replace(b'"value":0', b'"value":' + literal)
    assert _reasons(_decode(raw, lenient=False)) == [("not_json", None)]
    out = _decode(raw, lenient=True)
    assert _reasons(out) == [("not_finite", None)]
    assert out.rejects[0].detail.startswith("value: ")


def test_non_finite_item_of_a_batch_is_refused_alone_when_lenient() -> None:
    raw = b"[" + orjson.dumps(_r(seq=1)) + b"," + orjson.dumps(_r(seq=2)).replace(b"21.5", b"NaN") + b"]"
    out = _decode(raw, lenient=True)
    assert out.items == [(0, _r(seq=1))]
    assert _reasons(out) == [("not_finite", 1)]
    assert item_bytes(out.rejects[0].item, raw) == orjson.dumps(_r(seq=2)).replace(b"21.5", b"NaN")
    assert _reasons(_decode(raw, lenient=False)) == [("not_json", None)]  # strict: the whole message


@pytest.mark.parametrize(
    ("raw", "got"),
    [(b'"x"', "str"), (b"42", "int"), (b"null", "NoneType"), (b"true", "bool"), (b"1.5", "float")],
)
def test_wrong_shape(raw: bytes, got: str) -> None:
    out = _decode(raw)
    assert _reasons(out) == [("wrong_shape", None)]
    assert out.rejects[0].detail == f"expected an object or a list, got {got}"


def test_wrong_shape_items_of_a_batch() -> None:
    out = _decode(orjson.dumps([_r(), "x", [1], None, 3]))
    assert out.items == [(0, _r())]
    assert _reasons(out) == [("wrong_shape", 1), ("wrong_shape", 2), ("wrong_shape", 3), ("wrong_shape", 4)]
    assert out.rejects[0].detail == "reading must be an object, got str"
    assert out.rejects[1].item == [1]


def test_a_list_for_a_contract_that_does_not_batch_is_the_wrong_shape() -> None:
    out = _decode(b"[{}]", ESCALATION)
    assert out.batch is False
    assert _reasons(out) == [("wrong_shape", None)]
    assert out.rejects[0].detail == "expected an object, got list"


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b'{"device":"d1",}', b"{}x", b"nope", b"[1,]", b"{'a':1}", b"\x00"],
)
def test_not_json(raw: bytes) -> None:
    for lenient in (False, True):
        out = _decode(raw, lenient=lenient)
        assert _reasons(out) == [("not_json", None)]
        assert out.items == []


def test_a_byte_order_mark_is_not_json_unless_lenient() -> None:
    raw = b"\xef\xbb\xbf" + orjson.dumps(_r())
    assert _reasons(_decode(raw)) == [("not_json", None)]
    # the lenient path's standard parser skips a UTF-8 BOM (json.loads on bytes), so it is read
    assert _decode(raw, lenient=True).items == [(0, _r())]


@pytest.mark.parametrize("lenient", [False, True])
@pytest.mark.parametrize("depth", [1100, 100_000])
def test_huge_nesting_is_not_json_and_never_a_crash(depth: int, lenient: bool) -> None:
    for raw in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        out = _decode(raw, max_bytes=10 * depth, lenient=lenient)
        assert _reasons(out) == [("not_json", None)]


def test_nesting_inside_a_field_is_that_fields_problem() -> None:
    raw = orjson.dumps(_r()).replace(b'"unit":"C"', b'"unit":' + b"[" * 500 + b"]" * 500)
    out = _decode(raw)
    assert _reasons(out) == [("wrong_type", None)]
    assert out.rejects[0].detail.startswith("unit: ")


def test_leading_whitespace_still_decodes() -> None:
    assert _decode(b" \n" + orjson.dumps(_r())).items == [(0, _r())]
    assert _decode(b"\t" + orjson.dumps([_r()])).items == [(0, _r())]


def test_lone_surrogate_is_refused() -> None:
    raw = orjson.dumps(_r()).replace(b'"C"', b'"\\ud800"')
    assert [r.reason for r in _decode(raw).rejects] == ["not_json"]
    assert [r.reason for r in _decode(raw, lenient=True).rejects] == ["invalid"]  # never accepted


# --- EVENT: the optional fields -------------------------------------------------------------------
@pytest.mark.parametrize(
    "field", ["id", "ts", "trace", "device", "seq", "metric", "value", "unit", "ingest_ns"]
)
def test_event_decode_requires_its_keys_on_both_paths(field: str, slow_calls: list[bytes]) -> None:
    ev = _ingest_event()
    del ev[field]
    raw = orjson.dumps(ev)
    out = _decode(raw, EVENT)
    assert _reasons(out) == [("missing_field", None)]
    assert out.rejects[0].detail.startswith(f"{field}: ")
    assert slow_calls == [raw]  # the fast path saw it missing and left the detail to the slow path
    batch = _decode(orjson.dumps([_ingest_event(), ev]), EVENT)
    assert _reasons(batch) == [("missing_field", 1)]
    assert batch.items == [(0, _ingest_event())]


@pytest.mark.parametrize("field", ["v", "gap", "late"])
def test_event_decode_leaves_the_other_keys_optional(field: str) -> None:
    """The decoder asks of an event what the Event model (and so the JSON Schema) requires: only
    what has a default there (v, gap, late) may be left out."""
    ev = _ingest_event()
    del ev[field]
    out = _decode(orjson.dumps(ev), EVENT)
    assert out.rejects == []
    assert out.items == [(0, ev)]  # decoded as sent: no defaults filled in


def test_event_decode_refusals() -> None:
    good = _ingest_event()
    cases: list[tuple[dict[str, object], str]] = [
        ({"v": 2}, "wrong_type"),
        ({"id": ""}, "invalid"),
        ({"id": "x" * 129}, "invalid"),
        ({"trace": "x" * 129}, "invalid"),
        ({"gap": -1}, "out_of_range"),
        ({"late": 1}, "wrong_type"),
        ({"value": "NaN"}, "wrong_type"),
        ({"device": "d/1"}, "bad_identifier"),
        ({"extra": True}, "extra_field"),
    ]
    raw = orjson.dumps([good] + [{**good, **bad} for bad, _ in cases])
    out = _decode(raw, EVENT)
    assert out.items == [(0, good)]
    assert _reasons(out) == [(reason, i + 1) for i, (_, reason) in enumerate(cases)]


def test_decode_reasons_are_a_fixed_set() -> None:
    assert len(set(DECODE_REASONS)) == len(DECODE_REASONS)
    assert all(re.fullmatch(r"[a-z_0-9]+", r) for r in DECODE_REASONS)
