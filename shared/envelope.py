"""The message contracts: the reading devices send, and the envelope every service publishes.

Every published message carries ``v`` (schema version), ``id`` (unique), ``ts`` (UTC epoch ns of the
origin) and ``trace`` (the id of the reading that started the chain). The pydantic models document
and validate the shapes; hot paths use the TypeAdapters below, which validate to plain dicts and skip
building model instances.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter
from typing_extensions import TypedDict

SCHEMA_VERSION = 1

Segment = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Unit = Annotated[str, StringConstraints(min_length=1, max_length=16)]


class Reading(BaseModel):
    """One measurement from one device, as the device sends it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    device: Segment = Field(description="Device id; must equal the topic's device level.")
    seq: int = Field(ge=0, lt=2**63, description="Per-device monotonic sequence number.")
    ts: int = Field(ge=0, lt=2**63, description="UTC epoch nanoseconds at the device.")
    metric: Segment = Field(description="What was measured, e.g. temperature, shelf_weight.")
    value: FiniteFloat = Field(description="The measured value; NaN and Infinity are refused.")
    unit: Unit = Field(description="Unit as sent; normalized by ingest (docs/units.md).")


class ReadingDict(TypedDict):
    device: str
    seq: int
    ts: int
    metric: str
    value: float
    unit: str


class _ReadingTD(TypedDict):
    """The same contract as :class:`Reading`, as a TypedDict so validation returns plain dicts."""

    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)  # type: ignore[misc]
    device: Segment
    seq: Annotated[int, Field(ge=0, lt=2**63)]
    ts: Annotated[int, Field(ge=0, lt=2**63)]
    metric: Segment
    value: Annotated[float, Field(allow_inf_nan=False)]
    unit: Unit


READING = TypeAdapter(_ReadingTD)
"""Validates one reading (a dict) in about a microsecond."""


class Event(BaseModel):
    """A validated, normalized reading, as ingest publishes it on ``.../events/{device}``."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = 1
    id: str = Field(description="Deterministic from (site, device, seq): a re-delivery keeps its id.")
    ts: int = Field(description="The reading's device timestamp, epoch ns.")
    trace: str = Field(description="The id of the reading that started the chain (its own id here).")
    device: str
    seq: int
    metric: str
    value: float
    unit: str = Field(description="Canonical unit after normalization.")
    ingest_ns: int = Field(description="When ingest received the reading, epoch ns.")
    gap: int = Field(0, description="Readings missing just before this one (seq jumped by gap+1).")
    late: bool = Field(False, description="Arrived after a higher seq from the same device.")


class DeadLetter(BaseModel):
    """A rejected input, as published on ``.../dlq/{stage}``."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = 1
    id: str
    ts: int = Field(description="When it was rejected, epoch ns.")
    trace: str = Field(description="The reading's id when known, else this entry's id.")
    stage: str
    reason: str = Field(description="Machine-readable reason, one of a fixed set per stage.")
    detail: str = Field(description="Human-readable explanation.")
    topic: str = Field(description="Topic the input arrived on (truncated to 512 characters).")
    index: int | None = Field(None, description="Position in the batch, for one bad reading of many.")
    payload_b64: str = Field(description="The original bytes (or the bad batch item), base64.")
    payload_len: int = Field(description="Length of the original bytes.")
    truncated: bool = Field(False, description="payload_b64 holds only a prefix (oversize input).")


def now_ns() -> int:
    return time.time_ns()


def new_id() -> str:
    """A random unique id (for things with no natural key)."""
    return uuid.uuid4().hex


def reading_id_prefix(site: str, device: str, epoch: int = 0) -> bytes:
    """What :func:`reading_id` hashes before the seq (hot paths seed a hasher with it once)."""
    return f"{site}/{device}/{epoch}:".encode() if epoch else f"{site}/{device}/".encode()


def reading_id(site: str, device: str, seq: int, epoch: int = 0) -> str:
    """The id of a reading: the same (site, device, seq) always gets the same id, so a reading that
    is delivered twice after a crash comes out twice with one id and consumers drop the copy.
    ``epoch`` counts the device's counter restarts, so seqs reused after a restart get new ids."""
    return hashlib.blake2b(reading_id_prefix(site, device, epoch) + b"%d" % seq, digest_size=12).hexdigest()


DLQ_PAYLOAD_MAX = 64 * 1024


def item_bytes(item: Any, raw: bytes) -> bytes:
    """One bad item of a batch, re-encoded for its dead letter. The standard encoder keeps what
    orjson would change or refuse (NaN and Infinity, integers beyond 64 bits); an item it cannot
    encode either (nesting too deep) is represented by the whole message."""
    try:
        return json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode()
    except (ValueError, TypeError, RecursionError):
        return raw


def dead_letter(
    *,
    stage: str,
    reason: str,
    detail: str,
    topic: str,
    payload: bytes,
    trace: str | None = None,
    index: int | None = None,
) -> bytes:
    """Serialize a DLQ entry. Oversize payloads keep a prefix (flagged ``truncated``)."""
    entry_id = new_id()
    truncated = len(payload) > DLQ_PAYLOAD_MAX
    body: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "id": entry_id,
        "ts": now_ns(),
        "trace": trace or entry_id,
        "stage": stage,
        "reason": reason,
        "detail": detail[:1000],
        "topic": topic[:512],
        "index": index,
        "payload_b64": base64.b64encode(payload[:DLQ_PAYLOAD_MAX]).decode(),
        "payload_len": len(payload),
        "truncated": truncated,
    }
    return orjson.dumps(body)
