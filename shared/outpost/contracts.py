"""Every message on the bus, as one typed contract: its shape, its schema version, a validating
decoder and an encoder that writes the envelope header.

Every published message carries ``v`` (schema version), ``id`` (unique), ``ts`` (UTC epoch ns of
the origin) and ``trace`` (the id of the reading that started the chain); :func:`header` writes
them, so no service spells them out by hand. The pydantic models document the shapes and are what
``docs/contracts/*.schema.json`` is generated from (:func:`json_schemas`);
the hot paths decode with :class:`Contract`, whose TypedDict adapters validate straight from JSON
bytes to plain dicts (about a microsecond a reading; docs/benchmarks.md). ``python -m
outpost.schemas docs/contracts`` regenerates the schemas.

Which topic carries which contract is in :mod:`outpost.topics` (builders and parsers side by side)
and in docs/topics.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Generic, Literal, NotRequired, TypeVar

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    with_config,
)
from pydantic.types import FailFast
from typing_extensions import TypedDict

SCHEMA_VERSION: Final = 1

Segment = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
"""An identifier that becomes a topic level (site, device, model, agent, connector, ...)."""
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Unit = Annotated[str, StringConstraints(min_length=1, max_length=16)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=128)]
EpochNs = Annotated[int, Field(ge=0, lt=2**63)]


# --- the envelope -----------------------------------------------------------------------------------
def now_ns() -> int:
    return time.time_ns()


def new_id() -> str:
    """A random unique id (for things with no natural key)."""
    return uuid.uuid4().hex


def header(trace: str = "", *, id: str | None = None, ts: int | None = None) -> dict[str, Any]:
    """The envelope header every published message starts with. ``id`` defaults to a new random
    id (pass a deterministic one where a redelivery must keep it), ``ts`` to now."""
    return {
        "v": SCHEMA_VERSION,
        "id": id or new_id(),
        "ts": now_ns() if ts is None else ts,
        "trace": trace,
    }


def encode(trace: str = "", /, **body: Any) -> bytes:
    """One message: the envelope header, then ``body``."""
    return orjson.dumps({**header(trace), **body})


class Envelope(BaseModel):
    """The header every message a service publishes starts with."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = Field(1, description="Schema version of this contract.")
    id: Id = Field(description="Unique id of this message (deterministic where a redelivery keeps it).")
    ts: EpochNs = Field(description="UTC epoch nanoseconds of the origin.")
    trace: str = Field(
        max_length=128, description="The id of the reading that started the chain ('' when none did)."
    )


def reading_id_prefix(site: str, device: str, epoch: int = 0) -> bytes:
    """What :func:`reading_id` hashes before the seq (hot paths seed a hasher with it once)."""
    return f"{site}/{device}/{epoch}:".encode() if epoch else f"{site}/{device}/".encode()


def reading_id(site: str, device: str, seq: int, epoch: int = 0) -> str:
    """The id of a reading: the same (site, device, seq) always gets the same id, so a reading that
    is delivered twice after a crash comes out twice with one id and consumers drop the copy.
    ``epoch`` counts the device's counter restarts, so seqs reused after a restart get new ids."""
    return hashlib.blake2b(reading_id_prefix(site, device, epoch) + b"%d" % seq, digest_size=12).hexdigest()


def derived_id(*parts: str) -> str:
    """A deterministic id from the parts (a score's from its model and event): a redelivered input
    produces an output with the id it had the first time, so consumers drop the copy by id."""
    return hashlib.blake2b("/".join(parts).encode(), digest_size=12).hexdigest()


# --- devices -> ingest ------------------------------------------------------------------------------
class Reading(BaseModel):
    """One measurement from one device, as the device sends it on ``.../dev/{device}/telemetry``
    (one reading, or a JSON list of them). No envelope: devices are not Outpost services."""

    model_config = ConfigDict(extra="forbid", strict=True)

    device: Segment = Field(description="Device id; must equal the topic's device level.")
    seq: int = Field(ge=0, lt=2**63, description="Per-device monotonic sequence number.")
    ts: int = Field(ge=0, lt=2**63, description="UTC epoch nanoseconds at the device.")
    metric: Segment = Field(description="What was measured, e.g. temperature, shelf_weight.")
    value: FiniteFloat = Field(description="The measured value; NaN and Infinity are refused.")
    unit: Unit = Field(description="Unit as sent; normalized by ingest (docs/ingest.md, Units).")


@with_config(ConfigDict(extra="forbid", strict=True))
class ReadingDict(TypedDict):
    """The same contract as :class:`Reading`, as a TypedDict so validation returns plain dicts."""

    device: Segment
    seq: Annotated[int, Field(ge=0, lt=2**63)]
    ts: Annotated[int, Field(ge=0, lt=2**63)]
    metric: Segment
    value: Annotated[float, Field(allow_inf_nan=False)]
    unit: Unit


# --- ingest -> everyone -----------------------------------------------------------------------------
class Event(Envelope):
    """A validated, normalized reading, as ingest publishes it on ``.../events/{device}`` (a JSON
    list of events of one device)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    device: Segment
    seq: int = Field(ge=0, lt=2**63)
    metric: Segment
    value: FiniteFloat
    unit: Unit = Field(description="Canonical unit after normalization (docs/ingest.md, Units).")
    ingest_ns: EpochNs = Field(description="When ingest received the reading, epoch ns.")
    gap: int = Field(0, ge=0, description="Readings missing just before this one (seq jumped by gap+1).")
    late: bool = Field(False, description="Arrived after a higher seq from the same device.")


@with_config(ConfigDict(extra="forbid", strict=True))
class EventDict(TypedDict):
    """The same contract as :class:`Event`, validated to a plain dict (what has a default in the
    model may be left out)."""

    v: NotRequired[Literal[1]]
    id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    ts: Annotated[int, Field(ge=0, lt=2**63)]
    trace: Annotated[str, StringConstraints(max_length=128)]
    device: Segment
    seq: Annotated[int, Field(ge=0, lt=2**63)]
    metric: Segment
    value: Annotated[float, Field(allow_inf_nan=False)]
    unit: Unit
    ingest_ns: Annotated[int, Field(ge=0, lt=2**63)]
    gap: NotRequired[Annotated[int, Field(ge=0)]]
    late: NotRequired[bool]


def event_dict(
    device: str, seq: int, metric: str, value: float, unit: str, *, ts: int | None = None, **fields: Any
) -> dict[str, Any]:
    """An event as ingest publishes it (id and trace ``{device}-{seq}``, stamped ``ts`` or now), for
    what stands in for ingest (tests, benchmarks); ``fields`` override or add fields. Ingest's own
    hot path builds its events inline."""
    eid = f"{device}-{seq}"
    ts = now_ns() if ts is None else ts
    ev: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "id": eid,
        "ts": ts,
        "trace": eid,
        "device": device,
        "seq": seq,
        "metric": metric,
        "value": value,
        "unit": unit,
        "ingest_ns": ts,
        "gap": 0,
        "late": False,
    }
    ev.update(fields)
    return ev


# --- inference --------------------------------------------------------------------------------------
class Score(Envelope):
    """One model's verdict on one event, on ``.../inference/{model}/{device}`` (a JSON list). Its id
    is derived from (model, event id), so a redelivered event scored again keeps it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    event: Id = Field(description="The scored event's id.")
    device: Segment
    model: Segment
    version: str = Field(max_length=64, description="The model version that scored it.")
    backend: str = Field(max_length=64, description="onnxruntime-cpu, tensorrt, ...")
    score: float = Field(ge=0, le=1, description="1 - P(normal label).")
    label: str = Field(max_length=64, description="The most likely label.")
    confidence: float = Field(ge=0, le=1, description="The probability of that label.")
    alert: bool = Field(description="score >= the model's threshold.")
    queue_ms: float = Field(ge=0, description="Time the request waited for its batch.")
    compute_ms: float = Field(ge=0, description="The batch's model call.")
    batch: int = Field(ge=1, description="Rows in that model call.")
    ingest_ns: EpochNs = Field(
        0, description="When the reading reached the site (ingest's ingest_ns); 0: not known."
    )


# --- agents -----------------------------------------------------------------------------------------
class Decision(Envelope):
    """What an agent decided, and why, on ``.../decisions/{agent}`` (a JSON list: a commit's
    decisions of one agent; a single object is read too)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    agent: Segment
    task: Id = Field(description="The decision loop's task (checkpointed under this name).")
    kind: Literal["act", "escalate", "ignore", "halt"] = Field(
        description="act: request an action; escalate: ask a person; ignore: nothing to do; halt: "
        "a supervisor stopped the agent."
    )
    capability: str | None = Field(None, max_length=128, description="What it wants done, e.g. notify.staff.")
    args: dict[str, Any] = Field(default_factory=dict, description="The capability's input.")
    confidence: float = Field(ge=0, le=1)
    reason: str = Field(max_length=2000, description="Why, in words a person reads.")
    dry_run: bool = Field(False, description="Decided and logged, never acted on.")


class Escalation(Envelope):
    """A decision an agent will not take alone, on ``.../escalations/{agent}``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    agent: Segment
    decision: Segment = Field(description="The decision's id; replies go to .../{decision}/reply.")
    question: str = Field(max_length=2000)
    options: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        min_length=1, max_length=16
    )
    expires_ns: EpochNs = Field(description="After this the agent takes its default (or none).")
    context: dict[str, Any] = Field(
        default_factory=dict,
        description="What the agent saw: the input's fields, the device's features, its reason.",
    )


class EscalationReply(Envelope):
    """A person's answer, on ``.../escalations/{agent}/{decision}/reply``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    choice: str = Field(min_length=1, max_length=64, description="One of the escalation's options.")
    by: str = Field(min_length=1, max_length=128, description="Who answered.")
    note: str = Field("", max_length=2000)
    args: dict[str, Any] | None = Field(
        None, description="With choice edit: the capability's input as the person changed it."
    )


# --- connectors -------------------------------------------------------------------------------------
class ActionRequest(Envelope):
    """A side effect an agent asks for, on ``.../actions/{connector}``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    key: Id = Field(description="Idempotency key: the same key has its effect once.")
    agent: Segment
    capability: str = Field(min_length=1, max_length=128)
    args: dict[str, Any] = Field(default_factory=dict)
    deadline_ns: EpochNs | None = Field(None, description="Not attempted after this.")


class ActionResult(Envelope):
    """What came of a request, on ``.../actions/{connector}/results``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    key: Id
    request: Id = Field(description="The request's id.")
    outcome: Literal["done", "failed", "duplicate", "expired", "refused"]
    detail: str = Field("", max_length=2000)
    result: Any = None
    attempts: int = Field(ge=0)
    cost: float = Field(0.0, ge=0)


# --- every service ----------------------------------------------------------------------------------
class DeadItem(BaseModel):
    """One item of a grouped dead letter: its position in the batch and why it was refused."""

    model_config = ConfigDict(extra="forbid")

    index: int
    detail: str


class DeadLetter(Envelope):
    """A rejected input, on ``.../dlq/{stage}``."""

    model_config = ConfigDict(extra="forbid")

    stage: str = Field(description="The service that refused it.")
    reason: str = Field(description="Machine-readable reason, one of a fixed set per stage.")
    detail: str = Field(description="Human-readable explanation.")
    topic: str = Field(description="Topic the input arrived on (truncated to 512 characters).")
    index: int | None = Field(None, description="Position in the batch, for one bad item of many.")
    payload_b64: str = Field(description="The original bytes (or the bad batch item), base64.")
    payload_len: int = Field(description="Length of the original bytes.")
    truncated: bool = Field(False, description="payload_b64 holds only a prefix (oversize input).")
    count: int = Field(
        1,
        ge=1,
        description="How many refused inputs this entry stands for: 1, or the items of one message "
        "grouped under one reason (``items`` lists them), or the messages shed from one source "
        "over an interval (``payload_b64`` then holds the first of them). Counters agree with the "
        "sum of ``count``, not with the number of entries.",
    )
    items: list[DeadItem] | None = Field(
        None, max_length=100, description="For a group: the first 100 items' index and reason detail."
    )


class Status(Envelope):
    """A service's retained status (and last will) on ``.../svc/{service}/status``."""

    model_config = ConfigDict(extra="forbid")

    service: str
    state: Literal["online", "offline", "stopped"]
    version: str
    config_hash: str
    pid: int
    started_ns: int
    health: Literal["ok", "degraded"] | None = None
    problems: list[str] | None = None
    reason: str | None = Field(None, description="Why offline (the last will says 'connection lost').")


class HistogramSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float


class Sketch(BaseModel):
    """Latencies (ms) one histogram recorded in one metrics interval, as the non-empty bins of a
    DDSketch of relative accuracy ``alpha`` (outpost.sketch): mergeable across intervals, services
    and devices with its quantiles still within ``alpha``."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(gt=0, lt=1, description="Relative accuracy; bins line up only for one alpha.")
    count: int = Field(ge=0)
    zeros: int = Field(0, ge=0, description="Values of 0 (below the mapping's range).")
    sum_ms: float = Field(ge=0, allow_inf_nan=False)
    min_ms: float = Field(ge=0, allow_inf_nan=False)
    max_ms: float = Field(ge=0, allow_inf_nan=False)
    keys: list[int] = Field(description="Bin keys of the logarithmic mapping, ascending.")
    counts: list[int] = Field(description="The count in each bin of ``keys``.")


class MetricsBatch(Envelope):
    """A service's counters and latency histograms, on ``.../metrics/{service}`` (docs/metrics.md)."""

    model_config = ConfigDict(extra="forbid")

    service: str
    started: EpochNs | None = Field(
        None, description="When the publishing process started: counters restart from 0 with a new one."
    )
    counters: dict[str, int]
    histograms: dict[str, HistogramSummary]
    sketches: dict[str, Sketch] = Field(
        default_factory=dict,
        description="Per histogram, what it recorded since this process's previous batch (none when "
        "nothing); a consumer that merges them gets exact-to-alpha quantiles over any span.",
    )
    state: dict[str, Any] | None = Field(None, description="What the service says of itself.")


# --- memory's request API ---------------------------------------------------------------------------
class MemoryResponse(BaseModel):
    """The answer to a request on ``.../memory/req/{op}`` (its body is the operation's model in
    outpost.services.memory.api), sent to the request's MQTT 5 response topic with its correlation data."""

    model_config = ConfigDict(extra="forbid")

    ok: bool
    result: Any = None
    error: str | None = Field(None, description="Machine-readable reason when not ok.")
    detail: str | None = None


# --- offset streams across the uplink (memory sync; outpost.streams) --------------------------------
class StreamBatch(BaseModel):
    """Records of one offset stream, on ``.../up/{part}/{stream}``: the records after ``prev``."""

    model_config = ConfigDict(extra="allow", strict=True)

    v: Literal[1]
    id: str = Field(max_length=256)
    site: Segment
    epoch: str = Field(min_length=1, max_length=64, description="The sender's stream history id.")
    stream: Segment
    prev: int = Field(ge=0, description="The offset just before the first record.")
    records: list[tuple[int, dict[str, Any]]] = Field(min_length=1, max_length=10_000)
    behind: int | None = Field(
        None,
        ge=0,
        lt=2**63,
        description="Offsets the sender held past this message when it sent it (its lag).",
    )


class StreamAck(BaseModel):
    """The receiver's acknowledgement on ``.../down/{part}/ack``: all of ``stream`` up to ``offset``
    is committed there."""

    model_config = ConfigDict(extra="ignore", strict=True)

    stream: str = Field(max_length=16)
    offset: int = Field(ge=0)
    epoch: str = Field(max_length=64)
    unknown: bool = Field(False, description="The receiver holds nothing of this history: resend all.")


# --- the downlink: commands from the cloud (outpost.downlink) -----------------------------------------
class Command(Envelope):
    """A command from the cloud for the site, on ``.../down/cmd/{target}``: applied at most once
    (by ``id``), never after ``expires_ns``; what came of it goes up as a :class:`CommandResult`.
    The target says what local input it becomes: ``escalation-reply`` (``body`` is an
    :class:`EscalationReply`'s fields, to ``decision`` of agent ``to``) or ``action`` (``body`` is an
    :class:`ActionRequest`'s fields, to connector ``to``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    expires_ns: EpochNs = Field(description="Refused (and reported expired) if it arrives after this.")
    to: Segment = Field(description="The agent (escalation-reply) or connector (action) it is for.")
    decision: Segment | None = Field(None, description="The escalation's decision (escalation-reply).")
    body: dict[str, Any] = Field(description="The local input's fields, without its envelope.")


class CommandResult(Envelope):
    """What came of a command from the cloud, on ``.../up/cmd/results``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    command: Id = Field(description="The command's id.")
    target: str = Field(max_length=64)
    outcome: Literal["applied", "expired", "duplicate", "rejected"]
    detail: str = Field("", max_length=2000)


AgentState = Literal["running", "paused", "stopped"]


class AgentsControl(BaseModel):
    """The agents' switch, ``control/agents/desired`` (retained): written by ``outpost agents
    stop|pause|resume`` and by the cloud (``down/desired/agents``, republished by
    :mod:`outpost.downlink`), read by the agent service. An agent's state is the stricter of
    ``all`` and its own entry; ``resume`` clears the halt of the agents it names (``*``: all) when
    ``ts`` is newer than the halt."""

    model_config = ConfigDict(extra="forbid", strict=True)

    all: AgentState = Field("running", description="Every agent at least this held.")
    agents: dict[str, AgentState] = Field(default_factory=dict, description="Per agent: its own state.")
    resume: list[str] = Field(default_factory=list, description="Agents whose halt is cleared, or *.")
    ts: int = Field(0, ge=0, description="Version, epoch ns (the cloud's and the CLI's clock).")


DESIRED: Final[dict[str, type[BaseModel]]] = {"agents": AgentsControl}
"""The desired-state document of each service that has one (``control/{service}/desired``)."""


def validation_summary(exc: ValidationError, limit: int = 5) -> str:
    """A ValidationError in one line for a person: each field and what is wrong with it."""
    parts = [
        f"{'.'.join(str(x) for x in e['loc']) or 'the document'}: {e['msg']}" for e in exc.errors()[:limit]
    ]
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


# --- decoding ---------------------------------------------------------------------------------------
DECODE_REASONS: Final = (
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
)
"""Why a payload does not fit its contract: the reasons every service's DLQ shares."""

_TYPE_REASONS: Final = {
    "missing": "missing_field",
    "extra_forbidden": "extra_field",
    "finite_number": "not_finite",
    "string_pattern_mismatch": "bad_identifier",
    "greater_than_equal": "out_of_range",
    "greater_than": "out_of_range",
    "less_than": "out_of_range",
    "less_than_equal": "out_of_range",
    "string_too_long": "invalid",
    "string_too_short": "invalid",
}


@dataclass(slots=True)
class Reject:
    """Why an input (or one item of a batch) was refused."""

    reason: str
    detail: str
    index: int | None = None
    """Position in a batch; None for the whole message."""
    item: Any = None
    """The bad batch item (re-encoded for its dead letter); None: the original bytes are shown."""


T = TypeVar("T")


@dataclass(slots=True)
class Decoded(Generic[T]):
    items: list[tuple[int, T]] = field(default_factory=list)
    """(index, item) of what fits the contract; index 0 for a single object."""
    rejects: list[Reject] = field(default_factory=list)
    batch: bool = False
    """The payload was a JSON list (rejects then name the item's index)."""


def reason_of(exc: ValidationError) -> tuple[str, str]:
    """A validation error as one of :data:`DECODE_REASONS` and a detail naming the field."""
    err = exc.errors(include_url=False)[0]
    kind = err["type"]
    loc = ".".join(str(p) for p in err["loc"]) or "(body)"
    value = err.get("input")
    if kind in _TYPE_REASONS:
        reason = _TYPE_REASONS[kind]
    elif kind == "int_type" and isinstance(value, float) and abs(value) >= 2**63:
        # orjson reads an integer beyond 64 bits as a float; it is an integer out of range
        return "out_of_range", f"{loc}: integer beyond 64 bits"
    elif kind == "json_invalid":
        reason = "not_json"
    elif kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error":
        reason = "wrong_type"
    else:
        reason = "invalid"
    return reason, f"{loc}: {err['msg']}"


class Contract(Generic[T]):
    """A message shape on the wire: its documenting model and a fast decoder.

    ``decode`` takes one object or (``batches``) a JSON list of them. The fast path validates the
    whole payload from bytes; only when that fails does it parse again item by item, so one bad
    item of a batch is refused alone (with its index and a precise reason) and the rest go on."""

    def __init__(
        self,
        name: str,
        model: type[BaseModel],
        item: Any,
        *,
        batches: bool,
    ) -> None:
        self.name = name
        self.model = model
        self.batches = batches
        self._one: TypeAdapter[T] = TypeAdapter(item)
        # FailFast: a batch that does not validate stops at its first bad item (the slow path then
        # says precisely why, item by item); without it pydantic built an error for every field of
        # every item first: 1.4 s for a 900 KB list of 300,000 `{}` (docs/ingest.md, "Limits").
        self._many: TypeAdapter[list[T]] | None = (
            TypeAdapter(Annotated[list[item], FailFast()]) if batches else None
        )

    def validate_python(self, item: Any) -> T:
        """One item (a parsed JSON object) checked against the contract."""
        return self._one.validate_python(item)

    def decode(
        self, raw: bytes, *, max_bytes: int, max_items: int = 10_000, lenient: bool = False
    ) -> Decoded[T]:
        """``lenient``: NaN, Infinity and 1e999 (not JSON, but what some devices send) are read
        and refused as ``not_finite`` rather than as ``not_json``."""
        out: Decoded[T] = Decoded()
        if len(raw) > max_bytes:
            out.rejects.append(Reject("too_large", f"{len(raw)} bytes > limit {max_bytes}"))
            return out
        head = raw[:1]
        try:
            if head == b"{":
                out.items.append((0, self._one.validate_json(raw)))
                return out
            if head == b"[" and self._many is not None:
                items = self._many.validate_json(raw)
                out.batch = True
                if 0 < len(items) <= max_items:
                    out.items = list(enumerate(items))
                    return out
        except ValueError:  # ValidationError is a ValueError; the slow path says precisely why
            pass
        return self._decode_slow(raw, max_items, lenient, out)

    def _decode_slow(self, raw: bytes, max_items: int, lenient: bool, out: Decoded[T]) -> Decoded[T]:
        out.items.clear()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.rejects.append(
                Reject("not_utf8" if lenient else "not_json", f"invalid UTF-8 at byte {exc.start}")
            )
            return out
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if not lenient:
                out.rejects.append(Reject("not_json", f"not JSON: {str(exc)[:200]}"))
                return out
            try:  # the standard parser reads NaN and Infinity: report them as what they are
                doc = json.loads(raw)
            except (ValueError, RecursionError):
                out.rejects.append(Reject("not_json", str(exc)[:200]))
                return out
        if isinstance(doc, dict):
            items: list[Any] = [doc]
        elif isinstance(doc, list) and self.batches:
            out.batch = True
            items = doc
            if not items:
                out.rejects.append(Reject("empty_batch", "a batch must hold at least one item"))
                return out
            if len(items) > max_items:
                out.rejects.append(Reject("batch_too_large", f"{len(items)} items > limit {max_items}"))
                return out
        else:
            want = "an object or a list" if self.batches else "an object"
            out.rejects.append(Reject("wrong_shape", f"expected {want}, got {type(doc).__name__}"))
            return out
        for i, item in enumerate(items):
            index = i if out.batch else None
            if not isinstance(item, dict):
                out.rejects.append(
                    Reject(
                        "wrong_shape",
                        f"{self.name} must be an object, got {type(item).__name__}",
                        index,
                        item,
                    )
                )
                continue
            try:
                out.items.append((i, self.validate_python(item)))
            except ValidationError as exc:
                reason, detail = reason_of(exc)
                out.rejects.append(Reject(reason, detail, index, item))
        return out


READING: Final[Contract[ReadingDict]] = Contract("reading", Reading, ReadingDict, batches=True)
EVENT: Final[Contract[EventDict]] = Contract("event", Event, EventDict, batches=True)


def model_contract(model: type[BaseModel], *, batches: bool = False) -> Contract[Any]:
    """A contract whose items are validated by the model itself (messages off the hot path)."""
    return Contract(model.__name__, model, model, batches=batches)


SCORE: Final = model_contract(Score, batches=True)
DECISION: Final = model_contract(Decision, batches=True)
ESCALATION: Final = model_contract(Escalation)
ESCALATION_REPLY: Final = model_contract(EscalationReply)
ACTION_REQUEST: Final = model_contract(ActionRequest)
ACTION_RESULT: Final = model_contract(ActionResult)
DEAD_LETTER: Final = model_contract(DeadLetter)
STATUS: Final = model_contract(Status)
METRICS: Final = model_contract(MetricsBatch)
MEMORY_RESPONSE: Final = model_contract(MemoryResponse)
STREAM_BATCH: Final = model_contract(StreamBatch)
STREAM_ACK: Final = model_contract(StreamAck)
COMMAND: Final = model_contract(Command)
COMMAND_RESULT: Final = model_contract(CommandResult)

CONTRACTS: Final[dict[str, tuple[Contract[Any], str]]] = {
    "reading": (READING, "outpost/v1/{site}/dev/{device}/telemetry"),
    "event": (EVENT, "outpost/v1/{site}/events/{device}"),
    "score": (SCORE, "outpost/v1/{site}/inference/{model}/{device}"),
    "decision": (DECISION, "outpost/v1/{site}/decisions/{agent}"),
    "escalation": (ESCALATION, "outpost/v1/{site}/escalations/{agent}"),
    "escalation-reply": (ESCALATION_REPLY, "outpost/v1/{site}/escalations/{agent}/{decision}/reply"),
    "action-request": (ACTION_REQUEST, "outpost/v1/{site}/actions/{connector}"),
    "action-result": (ACTION_RESULT, "outpost/v1/{site}/actions/{connector}/results"),
    "dead-letter": (DEAD_LETTER, "outpost/v1/{site}/dlq/{stage}"),
    "status": (STATUS, "outpost/v1/{site}/svc/{service}/status"),
    "metrics": (METRICS, "outpost/v1/{site}/metrics/{service}"),
    "memory-response": (MEMORY_RESPONSE, "(the request's MQTT 5 response topic)"),
    "stream-batch": (STREAM_BATCH, "outpost/v1/{site}/up/{part}/{stream}"),
    "stream-ack": (STREAM_ACK, "outpost/v1/{site}/down/{part}/ack"),
    "command": (COMMAND, "outpost/v1/{site}/down/cmd/{target}"),
    "command-result": (COMMAND_RESULT, "outpost/v1/{site}/up/cmd/results"),
    "agents-control": (
        model_contract(AgentsControl),
        "outpost/v1/{site}/control/agents/desired (from the cloud: outpost/v1/{site}/down/desired/agents)",
    ),
}
"""Every contract by name, with the topic that carries it (docs/contracts/ is generated from it)."""


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every contract, by name, for people who read the wire and not Python."""
    out: dict[str, dict[str, Any]] = {}
    for name, (contract, topic) in CONTRACTS.items():
        schema = contract.model.model_json_schema()
        schema["$id"] = f"https://outpost.dev/contracts/v{SCHEMA_VERSION}/{name}.schema.json"
        schema["x-topic"] = topic
        schema["x-batches"] = contract.batches
        out[name] = schema
    return out


# --- dead letters -----------------------------------------------------------------------------------
DLQ_PAYLOAD_MAX: Final = 64 * 1024


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
    count: int = 1,
    items: list[dict[str, Any]] | None = None,
    truncated: bool = False,
) -> bytes:
    """Serialize a DLQ entry. Oversize payloads keep a prefix (flagged ``truncated``); ``count``
    and ``items`` describe a group (:class:`DeadLetter`), ``truncated`` says the payload holds
    only some of the group's items."""
    entry_id = new_id()
    body = header(trace or entry_id, id=entry_id)
    body.update(
        stage=stage,
        reason=reason,
        detail=detail[:1000],
        topic=topic[:512],
        index=index,
        payload_b64=base64.b64encode(payload[:DLQ_PAYLOAD_MAX]).decode(),
        payload_len=len(payload),
        truncated=truncated or len(payload) > DLQ_PAYLOAD_MAX,
    )
    if count != 1:
        body["count"] = count
    if items is not None:
        body["items"] = items[:100]
    return orjson.dumps(body)
