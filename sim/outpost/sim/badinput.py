"""Bad input: the malformed payloads real fleets send, made on purpose and counted by kind.

Each kind breaks exactly one thing, so ingest rejects it with exactly one dead letter whose reason
is known in advance (:data:`EXPECTED_REASON`), and the good readings around it still go through.
That makes the DLQ checkable: after a run, the dead letters by reason must equal the report's bad
payloads by kind, mapped through that table.

Two families:

* message-level kinds (not JSON, not UTF-8, wrong shape, empty batch) spoil a whole message, so they
  are always published on their own and never poison a batch of good readings;
* reading-level kinds (wrong type, NaN, unknown unit, foreign device id, far-future timestamp, ...)
  are one bad item that may sit inside a batch.

A bad item carries the device's *next* seq without consuming it: ingest rejects it before seq
tracking, so the good reading that follows with the same seq is not a duplicate and leaves no gap.
The exception is ``duplicate_seq``, which resends the last good reading byte for byte.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Final

import orjson

from outpost.contracts import ReadingDict


class BadKind(StrEnum):
    NOT_JSON = "not_json"
    NOT_UTF8 = "not_utf8"
    WRONG_SHAPE = "wrong_shape"
    EMPTY_BATCH = "empty_batch"
    WRONG_TYPE = "wrong_type"
    NAN = "nan"
    UNKNOWN_UNIT = "unknown_unit"
    DEVICE_MISMATCH = "device_mismatch"
    TS_FUTURE = "ts_future"
    TS_PAST = "ts_past"
    MISSING_FIELD = "missing_field"
    EXTRA_FIELD = "extra_field"
    BAD_IDENTIFIER = "bad_identifier"
    NEGATIVE_SEQ = "negative_seq"
    DUPLICATE_SEQ = "duplicate_seq"


ALL_KINDS: Final[tuple[BadKind, ...]] = tuple(BadKind)

MESSAGE_LEVEL: Final[frozenset[BadKind]] = frozenset(
    {BadKind.NOT_JSON, BadKind.NOT_UTF8, BadKind.WRONG_SHAPE, BadKind.EMPTY_BATCH}
)
"""Kinds that spoil a whole message and so are always published alone."""

EXPECTED_REASON: Final[dict[BadKind, str]] = {
    BadKind.NOT_JSON: "not_json",
    BadKind.NOT_UTF8: "not_utf8",
    BadKind.WRONG_SHAPE: "wrong_shape",
    BadKind.EMPTY_BATCH: "empty_batch",
    BadKind.WRONG_TYPE: "wrong_type",
    BadKind.NAN: "not_finite",
    BadKind.UNKNOWN_UNIT: "unknown_unit",
    BadKind.DEVICE_MISMATCH: "device_mismatch",
    BadKind.TS_FUTURE: "ts_future",
    BadKind.TS_PAST: "ts_past",
    BadKind.MISSING_FIELD: "missing_field",
    BadKind.EXTRA_FIELD: "extra_field",
    BadKind.BAD_IDENTIFIER: "bad_identifier",
    BadKind.NEGATIVE_SEQ: "out_of_range",
    BadKind.DUPLICATE_SEQ: "duplicate",
}
"""The DLQ reason ingest gives each kind (docs/ingest.md lists the reasons)."""

_HOUR_NS: Final = 3600 * 10**9
_DAY_NS: Final = 24 * _HOUR_NS
_FIELDS: Final = ("device", "seq", "ts", "metric", "value", "unit")
_UNKNOWN_UNITS: Final = ("celsius", "degR", "furlong", "kgs", "mph", "Pa", "lbs", "%rh", "Cel")
_BAD_METRICS: Final = ("temp/room", "temp+", "#", "temp.c", "shelf weight", "m" * 65, "")
_EXTRA_FIELDS: Final = (("battery", 0.93), ("rssi", -71), ("fw", "2.4.1"), ("id", "abc"))


def _wrong_type(r: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Types a sloppy firmware sends: numbers as strings, a float timestamp, a bool value."""
    choice = rng.randrange(5)
    if choice == 0:
        r["value"] = str(r["value"])
    elif choice == 1:
        r["seq"] = str(r["seq"])
    elif choice == 2:
        r["ts"] = r["ts"] / 1e9
    elif choice == 3:
        r["value"] = rng.random() < 0.5
    else:
        r["device"] = rng.randint(1, 9999)
    return r


def make_bad(
    kind: BadKind,
    template: ReadingDict,
    rng: random.Random,
    *,
    last_good: bytes | None = None,
) -> bytes:
    """The bytes of one bad item of ``kind``, built from ``template`` (a well-formed reading of the
    device, see ``SimDevice.template``). For message-level kinds they are a whole message; else
    one JSON value that may go into a batch. ``duplicate_seq`` needs ``last_good``."""
    r: dict[str, Any] = dict(template)
    if kind is BadKind.NOT_JSON:
        good = orjson.dumps(r)
        variants: tuple[bytes, ...] = (
            good[: rng.randint(1, len(good) - 1)],  # cut off mid-message
            f"{r['metric']}={r['value']} {r['unit']}".encode(),  # a line protocol
            repr(r).encode(),  # Python's repr: single quotes
            b"{" + good[1:-1] + b",}",  # trailing comma
        )
        return variants[rng.randrange(len(variants))]
    if kind is BadKind.NOT_UTF8:
        variants = (
            orjson.dumps({**r, "unit": "°C"}).decode().encode("latin-1"),  # Latin-1 firmware
            b"\xff\xfe" + orjson.dumps(r).decode().encode("utf-16-le"),  # UTF-16 with a BOM
            b"\xc3(" + rng.randbytes(rng.randint(4, 40)),  # line noise after a bad lead byte
        )
        return variants[rng.randrange(len(variants))]
    if kind is BadKind.WRONG_SHAPE:
        variants = (b"42", orjson.dumps(r["value"]), b'"online"', b"null", b"true")
        return variants[rng.randrange(len(variants))]
    if kind is BadKind.EMPTY_BATCH:
        return b"[]"
    if kind is BadKind.WRONG_TYPE:
        return orjson.dumps(_wrong_type(r, rng))
    if kind is BadKind.NAN:
        # orjson writes NaN as null, so the literal is spliced in: what a C firmware's printf does.
        literal = (b"NaN", b"Infinity", b"-Infinity", b"1e999")[rng.randrange(4)]
        del r["value"]
        return b'{"value":' + literal + b"," + orjson.dumps(r)[1:]
    if kind is BadKind.UNKNOWN_UNIT:
        r["unit"] = _UNKNOWN_UNITS[rng.randrange(len(_UNKNOWN_UNITS))]
        return orjson.dumps(r)
    if kind is BadKind.DEVICE_MISMATCH:
        r["device"] = f"ghost-{rng.randrange(10**6):06d}"
        return orjson.dumps(r)
    if kind is BadKind.TS_FUTURE:
        r["ts"] = r["ts"] + rng.randint(_HOUR_NS, 30 * _DAY_NS)
        return orjson.dumps(r)
    if kind is BadKind.TS_PAST:
        r["ts"] = max(0, r["ts"] - rng.randint(8 * _DAY_NS, 365 * _DAY_NS))
        return orjson.dumps(r)
    if kind is BadKind.MISSING_FIELD:
        del r[_FIELDS[rng.randrange(len(_FIELDS))]]
        return orjson.dumps(r)
    if kind is BadKind.EXTRA_FIELD:
        name, value = _EXTRA_FIELDS[rng.randrange(len(_EXTRA_FIELDS))]
        r[name] = value
        return orjson.dumps(r)
    if kind is BadKind.BAD_IDENTIFIER:
        r["metric"] = _BAD_METRICS[rng.randrange(len(_BAD_METRICS))]
        return orjson.dumps(r)
    if kind is BadKind.NEGATIVE_SEQ:
        r["seq"] = -rng.randint(1, 1000)
        return orjson.dumps(r)
    if kind is BadKind.DUPLICATE_SEQ:
        if last_good is None:
            raise ValueError("duplicate_seq needs a reading that was already sent")
        return last_good
    raise AssertionError(f"unhandled bad kind {kind}")


class Injector:
    """Decides, item by item, whether the next item is bad and of which kind.

    It has its own Random (seeded per device), so ``--bad-ratio`` changes which payloads are bad
    but never the good readings' values."""

    def __init__(self, rng: random.Random, ratio: float, kinds: Sequence[BadKind] = ALL_KINDS) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError("bad ratio must be within [0, 1]")
        if ratio > 0 and not kinds:
            raise ValueError("a bad ratio above 0 needs at least one bad kind")
        self.rng = rng
        self.ratio = ratio
        self.kinds = tuple(kinds)
        self._without_dup = tuple(k for k in self.kinds if k is not BadKind.DUPLICATE_SEQ)

    def draw(self, *, can_duplicate: bool) -> BadKind | None:
        """The kind of the next item, or None for a good reading. ``duplicate_seq`` is only drawn
        once the device has sent a good reading (else another kind takes its turn, if any)."""
        if self.ratio <= 0.0 or self.rng.random() >= self.ratio:
            return None
        kinds = self.kinds if can_duplicate else self._without_dup
        if not kinds:
            return None
        return kinds[self.rng.randrange(len(kinds))]
