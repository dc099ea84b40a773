"""Turn one telemetry message into readings, or into precise reasons why not: the reading contract's
decoder (:data:`outpost.contracts.READING`), read leniently so NaN and Infinity are refused as
``not_finite`` rather than as garbage. Pure logic: no I/O, no clock.

The kit decodes every telemetry message this way before ingest's handler sees it; :func:`parse`
is the same call, for tests and tools that check a payload without a broker.
"""

from __future__ import annotations

from typing import Final

from outpost.contracts import DECODE_REASONS, READING, Decoded, ReadingDict, Reject

__all__ = ["REASONS", "Reject", "parse"]

# Every reason ingest dead-letters with (docs/ingest.md explains each): the contract's, the
# kit's, and ingest's own checks of a reading against its device, its clock and the unit table.
REASONS: Final = (
    *DECODE_REASONS,
    "bad_topic",
    "device_mismatch",
    "ts_future",
    "ts_past",
    "unknown_unit",
    "duplicate",
    "duplicate_key",
    "stale_seq",
    "rate_limited",
    "quarantined",
    "retained",
    "internal",
    "overloaded",
)
OWN_REASONS: Final = REASONS[len(DECODE_REASONS) :]


def parse(raw: bytes, *, max_payload: int, max_batch: int) -> Decoded[ReadingDict]:
    return READING.decode(raw, max_bytes=max_payload, max_items=max_batch, lenient=True)
