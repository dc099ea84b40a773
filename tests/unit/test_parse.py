"""outpost.services.ingest.parse: every reason it can give, and the fast and slow paths agreeing."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from outpost.services.ingest.parse import REASONS, parse

TS = 1_700_000_000_000_000_000


def reading(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"device": "d1", "seq": 1, "ts": TS, "metric": "temp", "value": 21.5, "unit": "C"}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def enc(doc: Any) -> bytes:
    return orjson.dumps(doc)


def p(raw: bytes, *, max_payload: int = 1_000_000, max_batch: int = 100) -> Any:
    return parse(raw, max_payload=max_payload, max_batch=max_batch)


def test_single_reading() -> None:
    out = p(enc(reading()))
    assert out.rejects == []
    assert out.batch is False
    assert out.items == [(0, reading())]


def test_batch() -> None:
    items = [reading(seq=i) for i in range(10)]
    out = p(enc(items))
    assert out.rejects == []
    assert out.batch is True
    assert out.items == list(enumerate(items))


def test_leading_whitespace_is_fine() -> None:
    out = p(b"  \n" + enc(reading()))
    assert out.rejects == []
    assert len(out.items) == 1


def only_reason(raw: bytes, **kw: Any) -> tuple[str, Any]:
    out = p(raw, **kw)
    assert out.items == []
    assert len(out.rejects) == 1, out.rejects
    rej = out.rejects[0]
    assert rej.reason in REASONS
    assert rej.detail
    return rej.reason, rej.index


def test_too_large() -> None:
    raw = enc(reading())
    assert only_reason(raw, max_payload=len(raw) - 1) == ("too_large", None)
    assert p(raw, max_payload=len(raw)).rejects == []


@pytest.mark.parametrize("raw", [b"\xff\xfe", b'{"device":"d\xff1"}', b"[\x80]", b'{"a":"\xc3\x28"}'])
def test_not_utf8(raw: bytes) -> None:
    assert only_reason(raw) == ("not_utf8", None)


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"{", b"[", b'{"device":', b"{'a': 1}", enc(reading()) + b" x", b"[" * 5000],
    ids=["empty", "text", "open-brace", "open-bracket", "cut", "single-quotes", "trailing", "deep"],
)
def test_not_json(raw: bytes) -> None:
    assert only_reason(raw) == ("not_json", None)


@pytest.mark.parametrize("raw", [b"42", b"-1.5", b'"hello"', b"null", b"true"])
def test_wrong_shape(raw: bytes) -> None:
    assert only_reason(raw) == ("wrong_shape", None)


def test_list_of_numbers_is_wrong_shape_per_item() -> None:
    out = p(b"[1, 2, 3]")
    assert out.items == []
    assert [(r.reason, r.index, r.item) for r in out.rejects] == [
        ("wrong_shape", 0, 1),
        ("wrong_shape", 1, 2),
        ("wrong_shape", 2, 3),
    ]


def test_empty_batch() -> None:
    assert only_reason(b"[]") == ("empty_batch", None)


def test_batch_too_large() -> None:
    raw = enc([reading(seq=i) for i in range(6)])
    assert only_reason(raw, max_batch=5) == ("batch_too_large", None)
    assert len(p(raw, max_batch=6).items) == 6


@pytest.mark.parametrize("field", ["device", "seq", "ts", "metric", "value", "unit"])
def test_missing_field(field: str) -> None:
    assert only_reason(enc(reading(**{field: _DROP}))) == ("missing_field", None)


def test_extra_field() -> None:
    assert only_reason(enc(reading(extra=1))) == ("extra_field", None)


@pytest.mark.parametrize(
    "bad",
    [
        {"seq": "1"},
        {"seq": True},
        {"seq": 1.0},
        {"ts": 1.5},
        {"ts": float(TS)},
        {"ts": "2024-01-01T00:00:00Z"},
        {"value": True},
        {"value": "1.5"},
        {"value": None},
        {"value": [1]},
        {"device": 5},
        {"metric": None},
        {"unit": {"u": 1}},
    ],
)
def test_wrong_type(bad: dict[str, Any]) -> None:
    assert only_reason(enc(reading(**bad))) == ("wrong_type", None)


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"])
def test_not_finite(token: bytes) -> None:
    raw = enc(reading(value=0.0)).replace(b'"value":0.0', b'"value":' + token)
    assert token in raw
    assert only_reason(raw) == ("not_finite", None)


@pytest.mark.parametrize("bad", [{"seq": -1}, {"ts": -1}, {"seq": 2**63}, {"ts": 2**63}])
def test_out_of_range(bad: dict[str, Any]) -> None:
    assert only_reason(enc(reading(**bad))) == ("out_of_range", None)


@pytest.mark.parametrize(
    "bad",
    [{"device": "a/b"}, {"device": "+"}, {"device": "x" * 65}, {"device": "d1\n"}, {"metric": "a b"}],
)
def test_bad_identifier(bad: dict[str, Any]) -> None:
    assert only_reason(enc(reading(**bad))) == ("bad_identifier", None)


@pytest.mark.parametrize("bad", [{"unit": ""}, {"unit": "u" * 17}])
def test_invalid(bad: dict[str, Any]) -> None:
    assert only_reason(enc(reading(**bad))) == ("invalid", None)


def test_one_bad_reading_in_a_batch() -> None:
    items: list[Any] = [reading(seq=i) for i in range(5)]
    items[2] = reading(seq=2, extra=True)
    items[4] = "not a reading"
    out = p(enc(items))
    assert out.batch is True
    assert [i for i, _ in out.items] == [0, 1, 3]
    assert [(r.reason, r.index) for r in out.rejects] == [("extra_field", 2), ("wrong_shape", 4)]
    assert out.rejects[0].item == items[2]
    assert out.rejects[1].item == "not a reading"


def test_nan_in_a_batch_is_rejected_alone() -> None:
    raw = b"[" + enc(reading(seq=1)) + b"," + enc(reading(seq=2)).replace(b"21.5", b"NaN") + b"]"
    out = p(raw)
    assert [i for i, _ in out.items] == [0]
    assert [(r.reason, r.index) for r in out.rejects] == [("not_finite", 1)]


def test_reasons_are_unique() -> None:
    assert len(set(REASONS)) == len(REASONS)


@pytest.mark.parametrize("field", ["seq", "ts"])
@pytest.mark.parametrize(
    "literal", [b"18446744073709551616", b"99999999999999999999999", b"-99999999999999999999"]
)
def test_integers_beyond_64_bits_are_out_of_range(field: str, literal: bytes) -> None:
    raw = enc(reading(**{field: 7})).replace(f'"{field}":7'.encode(), f'"{field}":'.encode() + literal)
    assert literal in raw
    assert only_reason(raw) == ("out_of_range", None)
