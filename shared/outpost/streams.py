"""Offset streams, resent until the far end acknowledges them: what crosses an unreliable link
(the uplink to the cloud) without loss and without doubles, whatever restarts on either side.

A **stream** is a sequence of records whose offsets only grow, kept in durable state (a
:class:`Source`) until the receiver has acknowledged them. The sender (:class:`OffsetStreams`)
sends what follows the last acknowledged offset as :class:`~outpost.contracts.StreamBatch`
messages on ``{root}/up/{part}/{stream}`` (QoS 1, ``batch`` records a message, each message saying
the offset before its first record, ``prev``), at most ``window`` offsets in flight. The receiver
(:class:`ReceivedStreams`) applies a record only if it follows the last one it holds, skips what
it holds already (replays are harmless), stops at a gap, and answers on ``{root}/down/{part}/ack``
(:class:`~outpost.contracts.StreamAck`) with the last offset it has *committed*: a PUBACK from a
broker or a bridge is not taken as delivery. The sender then forgets what was acknowledged. With
no acknowledgement for ``resend_s``, or when the link comes back, it sends again from the last
acknowledged offset (go-back-N), which is also where a restarted sender resumes. Each resend in a
row without progress doubles the wait for the next (up to ``2**BACKOFF_DOUBLINGS`` times
``resend_s``): over a link that is gone before the bridge notices (a cut; its keepalive takes
15-20 s, and Mosquitto 2.0.11 does not report a link its keepalive found dead on
:meth:`~outpost.topics.Topics.uplink_state`), every resend is a window queued in the edge broker
for the bridge, delivered as duplicates once the link is back: a 20 s cut with a 1 s resend and a
2,000-record window cost 80,000 duplicate copies of a 10,000-record stream, 16,000-19,000 with the
backoff (tests/integration/test_link_faults.py).

An **epoch** names one history of the sender's streams. A sender that starts afresh (no state, or
state it cannot vouch for) takes a new epoch and offers each source the chance to queue all it has
again (:meth:`Source.snapshot`); a receiver that sees a new epoch starts the stream from offset 0
(its ``reset`` hook drops what it held), and one asked to go on from a history it does not hold
answers ``unknown``, upon which the sender sends that stream again from its start.

"While the link is up": the sender sends only while :meth:`OffsetStreams.link` says so; with
``link_topic`` it follows the retained up (``1``) / down state there (the edge broker's bridge
reports itself so, :meth:`outpost.topics.Topics.uplink_state`), without one the link is taken as up.

A **byte gate** (:class:`ByteBucket`, optional) caps what the sender publishes in bytes a second:
streams are offered the bucket in the order they were given (the first one's records go first),
and nothing is sent while the bucket is in debt.

A cloud side mounts the receiving end with :func:`receive_streams` (every site's messages applied,
answered, counted and dead-lettered the same way). The receiving side works on SQLite or on any
DB-API connection whose ``execute`` returns a cursor (PostgreSQL with psycopg 3): it is given how to
open a transaction and the driver's placeholder.

Two hops use it (:class:`Hop`): the uplink service to the cloud side (``outpost.services.uplink``,
its cloud side on PostgreSQL or SQLite: :func:`cloud_hop`), and memory sync into the uplink
service's outbox on the site's own broker (``outpost.services.memory.sync`` to
``outpost.services.uplink.relay``: :func:`outbox_hop`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar, cast

import orjson
from pydantic import ValidationError

from outpost.bus import Alarm
from outpost.contracts import Contract, StreamAck, StreamBatch, encode, header
from outpost.errors import BrokerError, TopicError
from outpost.log import get_logger
from outpost.service import Ack, Inbound, Rejected, ServiceRuntime
from outpost.store import Store, transaction
from outpost.topics import Topics

log = get_logger("outpost.streams")

REASONS = ("bad_ack",)
"""The dead-letter reason the sender gives (an acknowledgement it cannot take)."""

SENDER_SCHEMA = """
CREATE TABLE IF NOT EXISTS acked (
    stream TEXT PRIMARY KEY,
    "offset" INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
"""The sender's own state (in the store it is given, beside the sources' tables)."""

RECEIVER_SCHEMA = """CREATE TABLE IF NOT EXISTS streams (
    site TEXT NOT NULL,
    stream TEXT NOT NULL,
    last BIGINT NOT NULL,
    epoch TEXT NOT NULL,
    PRIMARY KEY (site, stream)
)"""
"""The receiver's ledger: per sender (site) and stream, the last offset held and its epoch (one
statement, 64-bit offsets on PostgreSQL too; :mod:`outpost.clouddb` makes it for every receiver,
each with stream names of its own)."""

Records = list[tuple[int, dict[str, Any]]]

BACKOFF_DOUBLINGS = 4
"""Resends in a row without progress double the wait this many times at most (16 x ``resend_s``)."""


@dataclass(frozen=True)
class Hop:
    """The topics of one hop of offset streams: where the sender publishes each stream (``to``)
    and hears the acknowledgements (``acks``), what the receiver subscribes (``inbound``), whom a
    message it received comes from (``origin``: site and stream, TopicError otherwise) and where it
    answers (``ack_to``, by site and stream). Two hops exist: the site's uplink to the cloud
    (:func:`cloud_hop`) and a part of the site to the uplink service's outbox (:func:`outbox_hop`)."""

    to: Callable[[str], str]
    acks: str
    inbound: str
    origin: Callable[[str], tuple[str, str]]
    ack_to: Callable[[str, str], str]
    to_cloud: bool
    """The uplink to the cloud: its sender's status is the uplink's (``uplink_up``, ``uplink``)."""


def cloud_hop(topics: Topics, part: str) -> Hop:
    """``up/{part}/{stream}`` to the cloud (over the bridge), answered on ``down/{part}/ack``;
    the receiver (the cloud side) hears every site of the installation."""

    def origin(topic: str) -> tuple[str, str]:
        site, of, stream = topics.site_up_of(topic)
        if of != part:
            raise TopicError(f"not a topic of {part!r}: {topic[:200]!r}")
        return site, stream

    return Hop(
        to=lambda stream: topics.up(part, stream),
        acks=topics.down(part, "ack"),
        inbound=topics.every_site_up(part),
        origin=origin,
        ack_to=lambda site, _stream: Topics(site=site, prefix=topics.prefix).down(part, "ack"),
        to_cloud=True,
    )


def outbox_hop(topics: Topics, part: str) -> Hop:
    """``outbox/{part}/{stream}`` on the site's own broker (never bridged), answered on
    ``outbox/{part}/{stream}/ack``: a part handing its streams to the uplink service's outbox."""

    def origin(topic: str) -> tuple[str, str]:
        of, stream = topics.outbox_of(topic)
        if of != part:
            raise TopicError(f"not a topic of {part!r}: {topic[:200]!r}")
        return topics.site, stream

    return Hop(
        to=lambda stream: topics.outbox(part, stream),
        acks=topics.all_outbox_acks(part),
        inbound=topics.all_outbox(part),
        origin=origin,
        ack_to=lambda _site, stream: topics.outbox_ack(part, stream),
        to_cloud=False,
    )


class Source(Protocol):
    """A stream's records, from durable state."""

    def after(self, offset: int, limit: int) -> Records:
        """Up to ``limit`` records after ``offset``, in order."""
        ...

    def trim(self, upto: int) -> None:
        """Forget what is acknowledged (offsets up to ``upto``)."""
        ...

    def last(self) -> int:
        """The last offset handed out (0 before the first)."""
        ...

    def expire(self, before_ns: int) -> int:
        """Drop records made before ``before_ns`` (never sent in time); how many went."""
        ...

    def snapshot(self) -> int:
        """Queue all the source holds again, as new records (a new epoch, or a receiver that lost
        the stream); how many. 0 where what was forgotten cannot be made again."""
        ...

    def pending(self, after: int) -> tuple[int, int | None]:
        """How many records after ``after`` it holds, and when the oldest of them was made (wall
        ns; None when it holds none): the backlog the receiver has not acknowledged, and its age.
        Read every metrics interval: keep it a range of the offsets' index (the backlog's rows)."""
        ...


class ByteBucket:
    """A token bucket over bytes: ``rate`` a second, at most ``burst`` saved up. A send is allowed
    while the bucket is not in debt and charged in full after (a message is never split), so the
    rate holds on average, overshooting by at most one message and the burst over any span."""

    def __init__(self, rate: float, burst: float, now: float | None = None) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = time.monotonic() if now is None else now

    def ready(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return self.tokens > 0

    def spend(self, nbytes: int) -> None:
        self.tokens -= nbytes

    def wait_s(self) -> float:
        """Seconds until the bucket is out of debt, as :meth:`ready` last left it (0: it is not):
        the sender sleeps that long."""
        if self.tokens > 0:
            return 0.0
        return -self.tokens / self.rate + 0.001 if self.rate > 0 else float("inf")


@dataclass
class Stream:
    name: str
    source: Source
    acked: int
    """The last offset the receiver acknowledged."""
    sent: int
    """The last offset sent (go-back-N sets it back to ``acked``)."""
    progress_at: float
    """monotonic time of the last progress (or of the first send after none was in flight)."""
    resends: int = 0
    """Resends in a row without progress since (the next waits ``resend_s * 2**resends``)."""


class OffsetStreams:
    """The sending side, on a service's kit: its subscriptions (the acknowledgements, the link
    state), timers (send, resend) and metrics (``{prefix}_sent.{stream}``, ``{prefix}_messages``,
    ``{prefix}_resends``, ``{prefix}_acked.{stream}``, ``{prefix}_again.{stream}``,
    ``{prefix}_stale_acks``, ``{prefix}_expired.{stream}``, ``uplink_changes``). Every call is made
    on the service's network thread.

    It sends when there is something to send: the owner calls :meth:`pump` (or :meth:`pump_soon`)
    once new records are on disk, the start, an acknowledgement or the link coming up pumps, a byte
    gate in debt wakes it when the debt is paid, and a stream with records in flight wakes it when
    its answer falls overdue. Nothing polls (a 0.2 s look for overdue answers was most of an idle
    uplink's and memory sync's wake-ups)."""

    def __init__(
        self,
        rt: ServiceRuntime,
        store: Store,
        sources: Mapping[str, Source],
        *,
        part: str,
        window: int,
        batch: int,
        resend_s: float,
        link_topic: str | None,
        afresh: bool = False,
        counter_prefix: str = "sync",
        gate: ByteBucket | None = None,
        hop: Hop | None = None,
    ) -> None:
        """``store`` holds the sender's state (apply :data:`SENDER_SCHEMA` to it). ``afresh``: the
        caller cannot vouch that the sources recorded everything since the stored epoch began (a
        new epoch is taken then, as when there is none). ``gate`` caps the bytes published (topic
        and payload); ``sources`` are offered it in their order (the first is the most urgent).
        ``hop``: the topics (:func:`cloud_hop` of ``part`` by default)."""
        self.rt = rt
        self.gate = gate
        self.store = store
        self.part = part
        self.window = window
        self.batch = batch
        self.resend_s = resend_s
        self._c = rt.metrics.counters
        self._p = counter_prefix
        self.epoch = self._epoch(sources, afresh)
        acked = {str(s): int(o) for s, o in store.query('SELECT stream, "offset" FROM acked')}
        now = time.monotonic()
        self.streams = {
            name: Stream(name, src, acked.get(name, 0), acked.get(name, 0), now)
            for name, src in sources.items()
        }
        self.link_up = link_topic is None
        self._pump_due: Alarm = rt.alarm(self.pump)
        self._final: dict[str, Any] | None = None
        hop = hop or cloud_hop(rt.topics, part)
        self._to_cloud = hop.to_cloud
        self._topic = {name: hop.to(name) for name in self.streams}
        # An acknowledgement is taken (the sender's store written, synchronous=FULL) before its
        # handler returns, and the link state changes nothing durable: AT_ONCE is "after its commit"
        # for both.
        rt.subscribe(hop.acks, self._on_ack, ack=Ack.AT_ONCE, counter=f"{counter_prefix}_acks")
        if link_topic is not None:
            rt.subscribe(link_topic, self._on_link, ack=Ack.AT_ONCE, counter="uplink_messages")
        self._resend_due: Alarm = rt.alarm(self.pump)
        if self.link_up:
            self.pump_soon()  # what was held at the last stop (or a new epoch's snapshot) goes now

    def _epoch(self, sources: Mapping[str, Source], afresh: bool) -> str:
        row = self.store.query("SELECT value FROM meta WHERE key = 'epoch'")
        if row and not afresh:
            return str(row[0][0])
        epoch = uuid.uuid4().hex
        self.store.db.execute("DELETE FROM acked")
        self.store.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
        again = {name: src.snapshot() for name, src in sources.items()}
        log.info("streams start afresh", extra={"part": self.part, "epoch": epoch, "records_again": again})
        return epoch

    # --- sending ---------------------------------------------------------------------------------
    def pump_soon(self, delay_s: float = 0.0) -> None:
        """Pump once the network thread has finished what it is doing (or ``delay_s`` from now),
        once for everything that asked meanwhile."""
        self._pump_due.soon(delay_s)

    def pump(self) -> None:
        """Send what the window allows; go back to the last acknowledged offset on a timeout."""
        if not self.link_up:
            return
        now = time.monotonic()
        try:
            for st in self.streams.values():
                if st.sent > st.acked and now - st.progress_at > self._answer_wait(st):
                    st.sent = st.acked
                    st.progress_at = now
                    st.resends += 1
                    self._c[f"{self._p}_resends"] += 1
                while (room := self.window - (st.sent - st.acked)) > 0:
                    if self.gate is not None and not self.gate.ready(now):
                        self.pump_soon(self.gate.wait_s())  # woken when the debt is paid
                        return  # what is more urgent keeps its turn: nothing after it goes first
                    records = st.source.after(st.sent, min(self.batch, room))
                    if not records:
                        break
                    if st.sent == st.acked:
                        st.progress_at = now  # the clock for an answer starts with the first in flight
                    self._send(st, records)
        finally:
            self._wake_when_overdue()

    def _answer_wait(self, st: Stream) -> float:
        """How long a stream's answer may take before it is sent again from its acknowledged offset
        (doubling with each resend in a row without progress)."""
        return self.resend_s * float(2 ** min(st.resends, BACKOFF_DOUBLINGS))

    def _wake_when_overdue(self) -> None:
        """Pump when the first answer now in flight falls overdue (a millisecond past it: overdue is
        "longer than"); an answer that comes first leaves it nothing to do but set the next."""
        due = min(
            (st.progress_at + self._answer_wait(st) for st in self.streams.values() if st.sent > st.acked),
            default=None,
        )
        if due is not None:
            self._resend_due.at(int(due * 1e9) + 1_000_000)

    def _send(self, st: Stream, records: Records) -> None:
        first, last = records[0][0], records[-1][0]
        site = self.rt.topics.site
        msg = header(id=f"{site}-{st.name}-{first}-{last}")
        # behind: offsets the sender holds past this message (holes included: an upper bound), so
        # the receiver can say how far each sender lags without asking it
        behind = max(0, st.source.last() - last)
        msg.update(site=site, epoch=self.epoch, stream=st.name, prev=st.sent, records=records, behind=behind)
        payload = orjson.dumps(msg)
        topic = self._topic[st.name]
        self.rt.publish(topic, payload)
        if self.gate is not None:
            self.gate.spend(len(payload) + len(topic))
        st.sent = last
        self._c[f"{self._p}_sent.{st.name}"] += len(records)
        self._c[f"{self._p}_messages"] += 1

    # --- what comes back -------------------------------------------------------------------------
    def _on_ack(self, inbound: Inbound[bytes]) -> None:
        try:
            ack = StreamAck.model_validate_json(inbound.raw)
            st = self._stream_of(ack)
        except (ValidationError, ValueError) as exc:
            raise Rejected("bad_ack", str(exc)[:500]) from None
        self.take(st, ack)
        self.pump_soon()  # the window has room again

    def _stream_of(self, ack: StreamAck) -> Stream:
        """The stream an acknowledgement is about; ValueError for one this sender never sent."""
        st = self.streams.get(ack.stream)
        if st is None:
            raise ValueError(f"unknown stream {ack.stream[:16]!r}")
        if ack.epoch == self.epoch and ack.offset > st.source.last():
            raise ValueError(f"{ack.stream}: offset {ack.offset} was never sent (last {st.source.last()})")
        return st

    def take(self, st: Stream, ack: StreamAck) -> None:
        if ack.epoch != self.epoch:  # about a history this sender no longer has: harmless
            self._c[f"{self._p}_stale_acks"] += 1
        elif ack.unknown:
            self._again(st)
        else:
            self._acknowledged(st, ack.offset)

    def _again(self, st: Stream) -> None:
        """The receiver lost this stream's history: send it again from the start (what the source
        can make again as a snapshot; what was acknowledged and forgotten otherwise is gone)."""
        if st.acked == 0:
            st.sent = 0  # nothing was forgotten here: resending from the start is enough
            return
        n = st.source.snapshot()
        self.store.db.execute("DELETE FROM acked WHERE stream = ?", (st.name,))
        log.warning(
            "the receiver lost this stream: sending it again from its start",
            extra={"part": self.part, "stream": st.name, "was_acked": st.acked, "records_again": n},
        )
        st.acked = st.sent = 0
        st.progress_at = time.monotonic()
        self._c[f"{self._p}_again.{st.name}"] += 1

    def _acknowledged(self, st: Stream, offset: int) -> None:
        if offset <= st.acked:
            return  # an old or repeated acknowledgement
        self.store.db.execute(
            'INSERT INTO acked (stream, "offset") VALUES (?, ?) ON CONFLICT(stream) DO UPDATE SET '
            '"offset" = max("offset", excluded."offset")',
            (st.name, offset),
        )
        st.source.trim(offset)
        self._c[f"{self._p}_acked.{st.name}"] += offset - st.acked
        st.acked = offset
        st.sent = max(st.sent, offset)
        st.progress_at = time.monotonic()
        st.resends = 0

    def _on_link(self, inbound: Inbound[bytes]) -> None:
        self.link(inbound.raw.strip() == b"1")

    def link(self, up: bool) -> None:
        """The link went up or down. Every ``up`` is a new connection of the bridge (or of this
        sender to its broker), also one not preceded by a ``down``: Mosquitto 2.0.11 reports no
        ``0`` when its keepalive finds the link dead, only a ``1`` again once it is back."""
        was, self.link_up = self.link_up, up
        if up:
            for st in self.streams.values():  # what was sent while the link flapped may be lost
                st.sent = st.acked
                st.progress_at = time.monotonic()
                st.resends = 0
            self.pump_soon()
            if not was:
                log.info("link up: sending from the last acknowledged offsets", extra=self.status())
        elif was:
            log.info("link down: sending waits", extra=self.status())
        self._c["uplink_changes"] += 1

    # --- upkeep ----------------------------------------------------------------------------------
    def expire(self, max_age_s: float) -> None:
        """Records the receiver has not taken within ``max_age_s`` go (counted and logged): a sender
        whose link stays down keeps a bounded backlog."""
        cutoff = time.time_ns() - int(max_age_s * 1e9)
        for st in self.streams.values():
            n = st.source.expire(cutoff)
            if n:
                self._c[f"{self._p}_expired.{st.name}"] += n
                log.warning(
                    "stream records expired before the receiver took them",
                    extra={"part": self.part, "stream": st.name, "records": n},
                )

    def status(self) -> dict[str, Any]:
        """For the sending service's metrics state (docs/metrics.md): ``{prefix}_{stream}``, the
        acknowledged offset and the records the receiver has not acknowledged (``backlog``); for
        the hop to the cloud also ``uplink_up``, whether the link is up, and ``uplink``, per stream
        the same backlog and the age in seconds of its oldest record (``age_s``, 0 without a
        backlog), which the telemetry service rolls up. Records that expired unsent are not in the
        backlog."""
        if self._final is not None:
            return self._final
        now = time.time_ns()
        uplink: dict[str, dict[str, float | int]] = {}
        offsets: dict[str, Any] = {}
        for st in self.streams.values():
            backlog, oldest_ns = st.source.pending(st.acked)
            age_s = 0.0 if oldest_ns is None or not backlog else max(0.0, (now - oldest_ns) / 1e9)
            uplink[st.name] = {"backlog": backlog, "age_s": round(age_s, 3)}
            offsets[f"{self._p}_{st.name}"] = {"acked": st.acked, "backlog": backlog}
        if not self._to_cloud:
            return offsets
        return {"uplink_up": self.link_up, "uplink": uplink, **offsets}

    def close(self) -> None:
        """Keep the last status readable (the sources' state may close after this)."""
        self._final = self.status()


# --- the receiving side -------------------------------------------------------------------------------
@dataclass
class Applied:
    """What one message did: the last offset now held, records applied, duplicates skipped,
    whether a gap stopped it, and the records refused (offset, why)."""

    last: int
    applied: int = 0
    duplicates: int = 0
    gap: bool = False
    rejected: list[tuple[int, str]] = field(default_factory=list)
    reset: bool = False
    """The sender's epoch was new here: what was held of this stream was dropped."""
    unknown: bool = False
    """The message goes on from a history this receiver does not hold (its state was lost, or the
    first message was): the sender must send this stream again from its start."""
    same_id: int = 0
    """Of ``applied``, records already held under another offset, recognised by their id (the
    sender took them twice) and so stored once: for receivers that keep records by id."""


class Cursor(Protocol):
    def fetchone(self) -> Any: ...


class Sql(Protocol):
    """What the receiver needs of a database connection (sqlite3's, psycopg 3's)."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Cursor: ...


DbT = TypeVar("DbT", bound=Sql)

ApplyOne = Callable[[DbT, StreamBatch, int, dict[str, Any]], None]
"""Apply one record (db, message, offset, body); ValidationError or ValueError refuses it alone."""


class ReceivedStreams(Generic[DbT]):
    """The receiving side's protocol on its database (with :data:`RECEIVER_SCHEMA` or a table
    ``streams`` of the same columns). ``begin`` opens one transaction (SQLite's
    :func:`~outpost.store.transaction` by default); ``paramstyle`` is the driver's placeholder
    (``format``: psycopg's ``%s``); ``apply_one`` and ``reset`` get the same connection, and write
    with its own placeholder."""

    def __init__(
        self,
        db: DbT,
        begin: Callable[[DbT], AbstractContextManager[Any]] | None = None,
        *,
        paramstyle: Literal["qmark", "format"] = "qmark",
        savepoints: bool = True,
    ) -> None:
        """``savepoints`` False: ``apply_one`` writes nothing before it may refuse a record (it
        checks, then writes, or collects what ``finish`` writes at once): a savepoint a record
        costs two round trips to a database server."""
        self.db = db
        self._begin = begin or cast(Callable[[DbT], AbstractContextManager[Any]], transaction)
        self._fmt = paramstyle == "format"
        self._savepoints = savepoints

    def _q(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._fmt else sql

    def last(self, site: str, stream: str) -> int:
        row = self.db.execute(
            self._q("SELECT last FROM streams WHERE site = ? AND stream = ?"), (site, stream)
        ).fetchone()
        return int(row[0]) if row else 0

    def apply(
        self,
        m: StreamBatch,
        apply_one: ApplyOne[DbT],
        *,
        reset: Callable[[DbT, StreamBatch], None] | None = None,
        finish: Callable[[DbT], None] | None = None,
    ) -> Applied:
        """Apply what follows the last record held, in one transaction. A record that cannot be
        applied is skipped and reported (the caller dead-letters it), so one bad record never
        blocks its stream; offsets that do not grow make the whole message invalid (ValueError,
        nothing written). ``reset`` drops what was held of a stream whose sender took a new epoch;
        ``finish`` runs in the transaction after the records (a bulk write of what they collected)."""
        db = self.db
        savepoints = self._savepoints
        with self._begin(db):
            row = db.execute(
                self._q("SELECT last, epoch FROM streams WHERE site = ? AND stream = ?"), (m.site, m.stream)
            ).fetchone()
            if row is None or row[1] != m.epoch:
                # a sender (or a history of it: wiped, replaced, paused) new to this receiver
                if m.prev != 0:  # it goes on from records this receiver never had: say so
                    return Applied(0, unknown=True)  # nothing was written
                out = Applied(0, reset=row is not None)
                if row is not None and reset is not None:
                    reset(db, m)
            else:
                out = Applied(int(row[0]))
            prev = m.prev
            for offset, body in m.records:
                if offset <= prev:
                    raise ValueError(f"offsets must grow: {offset} after {prev}")
                if offset <= out.last:
                    out.duplicates += 1
                elif prev == out.last:
                    try:
                        if savepoints:
                            db.execute("SAVEPOINT record")
                        apply_one(db, m, offset, body)
                        if savepoints:
                            db.execute("RELEASE record")
                        out.applied += 1
                    except (ValidationError, ValueError) as exc:
                        if savepoints:
                            db.execute("ROLLBACK TO record")
                            db.execute("RELEASE record")
                        out.rejected.append((offset, str(exc)[:500]))
                    out.last = offset
                else:
                    out.gap = True
                    break
                prev = offset
            if finish is not None:
                finish(db)
            db.execute(
                self._q(
                    "INSERT INTO streams (site, stream, last, epoch) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(site, stream) DO UPDATE SET last = excluded.last, epoch = excluded.epoch"
                ),
                (m.site, m.stream, out.last, m.epoch),
            )
        return out


def answer(m: StreamBatch, done: Applied) -> bytes:
    """The acknowledgement of one message: where the receiver stands on its stream, always (a lost
    acknowledgement costs one resend), ``unknown`` when it holds nothing of that history."""
    return encode("", stream=m.stream, offset=done.last, epoch=m.epoch, unknown=done.unknown)


def sender_of(hop: Hop, topic: str, m: StreamBatch, reason: str) -> tuple[str, str]:
    """The site and stream a received message comes from: its topic's, which the message must
    repeat (a site cannot write as another); :class:`Rejected` with ``reason`` otherwise."""
    try:
        site, stream = hop.origin(topic)
    except TopicError as exc:
        raise Rejected(reason, str(exc)) from None
    if (m.site, m.stream) != (site, stream):
        raise Rejected(reason, f"the message says {m.site}/{m.stream}, its topic {site}/{stream}")
    return site, stream


B = TypeVar("B", bound=StreamBatch)


class StoreUnavailableError(Exception):
    """What a receiver's ``apply`` raises when its database failed and nothing was committed: the
    message is left unanswered (the sender sends it again) and not dead-lettered."""


def receive_streams(
    rt: ServiceRuntime,
    part: str,
    contract: Contract[B],
    apply: Callable[[B], Applied],
    *,
    bad: str,
    max_bytes: int,
    hop: Hop | None = None,
) -> None:
    """Receive ``part``'s streams on ``rt``: of every site of the installation (the cloud side,
    :func:`cloud_hop`, the default), or of this site (``hop``: the uplink service's outbox,
    :func:`outbox_hop`). Each message is applied by ``apply`` (one transaction), then answered
    where ``hop`` says (the cloud: the site's ``down/{part}/ack``). ``bad``: the dead-letter reason
    of a message that is not a valid one of the site its topic names (and of ``apply``'s
    ValueError); a record refused alone is dead-lettered ``bad_record``. Counted:
    ``applied.{stream}``, ``duplicates``, ``duplicate_ids``, ``gaps``, ``resets``, ``unknown``,
    ``db_errors`` (while :class:`StoreUnavailableError`: the status says the error, nothing is
    answered).

    Committed before the handler returns, and the answer is an output it waits for
    (``AFTER_OUTPUTS``): the message is acknowledged only once the broker holds that answer. A crash
    between the commit and the answer has the broker redeliver the message, which is then a
    duplicate answered at once; acknowledged at once, the answer would be lost and the site would
    learn where the receiver stands only after its resend time, by resending a window of records
    across the uplink."""
    c = rt.metrics.counters
    hop = hop or cloud_hop(rt.topics, part)

    def on_message(inbound: Inbound[B]) -> None:
        m = inbound.items[0][1]
        site, stream = sender_of(hop, inbound.topic, m, bad)
        try:
            done = apply(m)
        except ValueError as exc:
            raise Rejected(bad, str(exc)[:1000]) from None
        except StoreUnavailableError as exc:
            c["db_errors"] += 1
            rt.set_problems([str(exc)])
            return
        rt.set_problems([])
        c[f"applied.{stream}"] += done.applied - done.same_id
        c["duplicates"] += done.duplicates
        c["duplicate_ids"] += done.same_id
        c["gaps"] += done.gap
        c["resets"] += done.reset
        c["unknown"] += done.unknown
        for offset, why in done.rejected:
            rt.dead_letter(
                "bad_record",
                f"{site}/{stream} record {offset}: {why}",
                inbound.topic,
                inbound.raw,
                for_=inbound.turn,
            )
        rt.publish(hop.ack_to(site, stream), answer(m, done), for_=inbound.turn)

    rt.subscribe(
        hop.inbound,
        on_message,
        contract=contract,
        ack=Ack.AFTER_OUTPUTS,
        invalid_reason=bad,
        max_bytes=max_bytes,
    )


def start_receiving(rt: ServiceRuntime, what: str, db_kind: str) -> None:
    """Start a cloud side's receiver: it returns at once and keeps trying the cloud broker (which
    may come up later; a stop request is heard meanwhile), but a broker that refuses its
    credentials is a :class:`~outpost.errors.BrokerError` at once, with what to set."""
    rt.start(wait_s=None)
    mqtt = rt.settings.mqtt
    where = f"{mqtt.host}:{mqtt.port}"
    log.info("receiver started", extra={"receiver": what, "db": db_kind, "broker": where})
    deadline = time.monotonic() + 5.0
    while not rt.bus.wait_connected(0.05) and rt.bus.refused is None and time.monotonic() < deadline:
        pass
    if rt.bus.refused is not None:
        rt.stop()
        raise BrokerError(
            f"the cloud broker at {where} refused {what}: {rt.bus.refused}; give its user "
            "(OUTPOST_MQTT__USERNAME=outpost.cloud, OUTPOST_MQTT__PASSWORD from the credentials/ "
            "folder that `outpost cloud broker-config` wrote)"
        )
    if not rt.bus.wait_connected(0):
        log.warning("no cloud broker answers yet; retrying", extra={"broker": where})
