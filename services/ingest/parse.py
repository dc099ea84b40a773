"""Turn one telemetry message into readings, or into precise reasons why not.

Fast path: pydantic validates the whole payload straight from JSON bytes (one reading or a list).
Only when that fails does the slow path parse again item by item, so one bad reading in a batch is
rejected alone and the good ones still go through. Pure logic: no I/O, no clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from pydantic import TypeAdapter, ValidationError

from outpost.contracts import READING, ReadingDict, _ReadingTD

READINGS: Final = TypeAdapter(list[_ReadingTD])

# Every reason ingest dead-letters with (docs/ingest.md explains each).
REASONS: Final = (
    "too_large",
    "not_utf8",
    "not_json",
    "wrong_shape",
    "empty_batch",
    "batch_too_large",
    "missing_field",
    "extra_field",
    "wrong_type",
    "not_finite",
    "out_of_range",
    "bad_identifier",
    "invalid",
    "bad_topic",
    "device_mismatch",
    "ts_future",
    "ts_past",
    "unknown_unit",
    "duplicate",
    "stale_seq",
    "rate_limited",
    "quarantined",
    "internal",
)


@dataclass(slots=True)
class Reject:
    reason: str
    detail: str
    index: int | None = None  # position in a batch; None for the whole message
    item: Any = None  # the bad batch item (re-encoded for the DLQ); None: use the original bytes


@dataclass(slots=True)
class Parsed:
    readings: list[tuple[int, ReadingDict]] = field(default_factory=list)  # (index, reading)
    rejects: list[Reject] = field(default_factory=list)
    batch: bool = False


_TYPE_REASONS: Final = {
    "missing": "missing_field",
    "extra_forbidden": "extra_field",
    "finite_number": "not_finite",
    "string_pattern_mismatch": "bad_identifier",
    "greater_than_equal": "out_of_range",
    "less_than": "out_of_range",
    "string_too_long": "invalid",
    "string_too_short": "invalid",
}


def _reason_of(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors(include_url=False)[0]
    kind = err["type"]
    loc = ".".join(str(p) for p in err["loc"]) or "reading"
    value = err.get("input")
    if kind in _TYPE_REASONS:
        reason = _TYPE_REASONS[kind]
    elif kind == "int_type" and isinstance(value, float) and abs(value) >= 2**63:
        # orjson reads an integer beyond 64 bits as a float; it is an integer out of range
        return "out_of_range", f"{loc}: integer beyond 64 bits"
    elif kind.endswith("_type") or kind.endswith("_parsing"):
        reason = "wrong_type"
    else:
        reason = "invalid"
    return reason, f"{loc}: {err['msg']}"


def parse(raw: bytes, *, max_payload: int, max_batch: int) -> Parsed:
    out = Parsed()
    if len(raw) > max_payload:
        out.rejects.append(Reject("too_large", f"{len(raw)} bytes > limit {max_payload}"))
        return out
    head = raw[:1]
    try:
        if head == b"{":
            out.readings.append((0, READING.validate_json(raw)))
            return out
        if head == b"[":
            items = READINGS.validate_json(raw)
            out.batch = True
            if 0 < len(items) <= max_batch:
                out.readings = list(enumerate(items))
                return out
    except ValueError:  # ValidationError is a ValueError; fall through to the precise slow path
        pass
    return _parse_slow(raw, max_batch, out)


def _parse_slow(raw: bytes, max_batch: int, out: Parsed) -> Parsed:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        out.rejects.append(Reject("not_utf8", f"invalid UTF-8 at byte {exc.start}"))
        return out
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # NaN, Infinity and 1e999 are not JSON; the standard parser reads them, so such a payload
        # is reported as the non-finite number it holds rather than as garbage.
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            out.rejects.append(Reject("not_json", str(exc)[:200]))
            return out
    if isinstance(doc, dict):
        items: list[Any] = [doc]
    elif isinstance(doc, list):
        out.batch = True
        items = doc
        if not items:
            out.rejects.append(Reject("empty_batch", "a batch must hold at least one reading"))
            return out
        if len(items) > max_batch:
            out.rejects.append(Reject("batch_too_large", f"{len(items)} readings > limit {max_batch}"))
            return out
    else:
        out.rejects.append(Reject("wrong_shape", f"expected an object or a list, got {type(doc).__name__}"))
        return out
    out.readings.clear()
    for i, item in enumerate(items):
        index = i if out.batch else None
        if not isinstance(item, dict):
            out.rejects.append(
                Reject("wrong_shape", f"reading must be an object, got {type(item).__name__}", index, item)
            )
            continue
        try:
            out.readings.append((i, READING.validate_python(item)))
        except ValidationError as exc:
            reason, detail = _reason_of(exc)
            out.rejects.append(Reject(reason, detail, index, item))
    return out
