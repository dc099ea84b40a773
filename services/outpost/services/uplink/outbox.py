"""The uplink's outbox: every record the cloud must get, on the site's disk (SQLite WAL,
``synchronous=FULL``) from before its producer is acknowledged until the cloud side has committed
it; one offset stream per kind of record, in priority order (:data:`STREAMS`).

A record is the producer's message as it came (its JSON bytes; one item of a batch is one record),
the topic it came on (below the site's root) and when it was taken. Offsets grow per stream and
never go back (the ``offsets`` table, written in the same transaction as the records), also when
records are trimmed, dropped or expire: the receiver needs only ``prev`` to match, not offsets
without holes.

The disk budget (:meth:`Outbox.enforce`) counts the records' bytes: over it, the oldest records of
the lowest-priority stream that holds any go first, then the next one up, never alerts nor memory
sync's (which waits for room instead).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson

from outpost.store import Store, transaction
from outpost.streams import RECEIVER_SCHEMA, SENDER_SCHEMA, Records

STREAMS = ("alerts", "decisions", "actions", "memory", "metrics", "events")
"""The uplink's streams, most urgent first: what is sent first, and (reversed, alerts never) what
gives way first when the outbox is over its disk budget."""

NEVER_DROPPED = frozenset(("alerts",))
"""Streams whose records neither expire nor give way to the disk budget."""

WAITS_FOR_ROOM = frozenset(("memory",))
"""Streams that do not give way to the disk budget either: while the outbox is over it they are
not taken (memory sync keeps its records in its own store meanwhile, :mod:`.relay`), so a stream
that must arrive whole is never cut to make room."""

MESSAGE_BYTES = 1_000_000
"""The records' bytes one message upstream carries at most by default (a bigger record goes alone)."""

SCHEMA = (
    SENDER_SCHEMA
    + """
CREATE TABLE IF NOT EXISTS records (
    stream TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    made_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    topic TEXT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (stream, "offset")
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS offsets (
    stream TEXT PRIMARY KEY,
    last INTEGER NOT NULL
);
"""
    + RECEIVER_SCHEMA
    + ";\n"
)
"""The sender's state, the records and their offsets, and the ledger of the streams the outbox
receives from the site's parts (memory sync's, :mod:`.relay`)."""


EXPIRED = (
    'stream = ?1 AND "offset" < coalesce((SELECT "offset" FROM records WHERE stream = ?1 '
    'AND made_ns >= ?2 ORDER BY "offset" LIMIT 1), 9223372036854775807)'
)
"""Which records of a stream are past their age: those before the first made at or after the
cutoff. ``made_ns`` is the wall clock when a record was taken, so it grows with the offset; read
this way the expiry walks only what it deletes, where ``made_ns < ?`` read the whole stream (15 ms
at 80,000 held events, on the network thread each minute) without a second index on every record
taken. A clock stepped back can leave a record past its age for a later pass, never take one
that is not."""


@dataclass(frozen=True, slots=True)
class Taken:
    """One record taken from the local broker, to be committed."""

    stream: str
    topic: str
    body: bytes
    made_ns: int


@dataclass(frozen=True, slots=True)
class Added:
    """What :meth:`Outbox.write` wrote: the streams' offsets after it, records and their bytes."""

    offsets: dict[str, int]
    count: int
    size: int


def drop_order() -> tuple[str, ...]:
    """The streams whose records may give way to the disk budget, first to go first."""
    return tuple(s for s in reversed(STREAMS) if s not in NEVER_DROPPED | WAITS_FOR_ROOM)


class Outbox:
    """The outbox's database. Every call is made on the uplink service's network thread."""

    def __init__(self, path: Path, *, message_bytes: int = MESSAGE_BYTES) -> None:
        """``message_bytes``: the records' bytes one message upstream carries at most (at least one
        record): small messages keep a byte cap close over short spans."""
        self.message_bytes = message_bytes
        self.store = Store(path, SCHEMA, synchronous="FULL")
        db = self.store.db
        self.offsets = {str(s): int(n) for s, n in db.execute("SELECT stream, last FROM offsets")}
        self.bytes = 0
        self.count = 0
        for n, b in db.execute("SELECT count(*), coalesce(sum(size), 0) FROM records"):
            self.count, self.bytes = int(n), int(b)

    def add(self, taken: Iterable[Taken]) -> int:
        """Commit records, in one transaction (one fsync); how many."""
        with transaction(self.store.db) as db:
            added = self.write(db, taken)
        return self.took(added)

    def write(self, db: sqlite3.Connection, taken: Iterable[Taken]) -> Added:
        """Write records in the caller's transaction on :attr:`store`'s connection; once it is
        committed, :meth:`took` counts them (and not before: a rollback writes nothing)."""
        rows = []
        last = dict(self.offsets)
        size = 0
        for t in taken:
            o = last.get(t.stream, 0) + 1
            last[t.stream] = o
            n = len(t.body) + len(t.topic)
            size += n
            rows.append((t.stream, o, t.made_ns, n, t.topic, t.body))
        if rows:
            db.executemany(
                'INSERT INTO records (stream, "offset", made_ns, size, topic, body) '
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.executemany(
                "INSERT INTO offsets (stream, last) VALUES (?, ?) "
                "ON CONFLICT(stream) DO UPDATE SET last = excluded.last",
                [(s, o) for s, o in last.items() if o != self.offsets.get(s)],
            )
        return Added(last, len(rows), size)

    def took(self, added: Added) -> int:
        """Count records :meth:`write` wrote, once committed; how many."""
        self.offsets = added.offsets
        self.count += added.count
        self.bytes += added.size
        return added.count

    def after(self, stream: str, offset: int, limit: int) -> Records:
        """Up to ``limit`` records after ``offset``, and no more than ``message_bytes`` of them (at
        least one): one message upstream stays within what the brokers take."""
        rows = self.store.query(
            'SELECT "offset", size, topic, body FROM records WHERE stream = ? AND "offset" > ? '
            'ORDER BY "offset" LIMIT ?',
            (stream, offset, limit),
        )
        out: Records = []
        size = 0
        for o, n, t, b in rows:
            size += int(n)
            if out and size > self.message_bytes:
                break
            out.append((int(o), {"topic": t, "body": orjson.loads(b)}))
        return out

    def _delete(self, where: str, params: tuple[object, ...]) -> int:
        """Delete the records ``where`` says, keeping the totals; how many went."""
        with transaction(self.store.db) as db:
            n, b = db.execute(
                f"SELECT count(*), coalesce(sum(size), 0) FROM records WHERE {where}", params
            ).fetchone()
            if n:
                db.execute(f"DELETE FROM records WHERE {where}", params)
        self.count -= int(n)
        self.bytes -= int(b)
        return int(n)

    def trim(self, stream: str, upto: int) -> int:
        return self._delete('stream = ? AND "offset" <= ?', (stream, upto))

    def expire(self, stream: str, before_ns: int) -> int:
        """The stream's records made before ``before_ns``, oldest first up to the first that is
        not (:data:`EXPIRED`)."""
        return self._delete(EXPIRED, (stream, before_ns))

    def last(self, stream: str) -> int:
        return self.offsets.get(stream, 0)

    def pending(self, stream: str, after: int) -> tuple[int, int | None]:
        n, oldest = self.store.query(
            'SELECT count(*), min(made_ns) FROM records WHERE stream = ? AND "offset" > ?', (stream, after)
        )[0]
        return int(n), None if oldest is None else int(oldest)

    def held(self) -> dict[str, tuple[int, int]]:
        """Per stream: records held and their bytes."""
        rows = self.store.query("SELECT stream, count(*), sum(size) FROM records GROUP BY stream")
        return {str(s): (int(n), int(b)) for s, n, b in rows}

    def enforce(self, max_bytes: int) -> dict[str, int]:
        """Bring the outbox within ``max_bytes``: the oldest records of the lowest-priority stream
        that holds any go first (:func:`drop_order`), never alerts. Per stream, how many went; when
        only alerts are left over the budget they stay (the caller warns)."""
        dropped: dict[str, int] = {}
        for stream in drop_order():
            excess = self.bytes - max_bytes
            if excess <= 0:
                break
            upto, freed = 0, 0
            rows = self.store.db.execute(
                'SELECT "offset", size FROM records WHERE stream = ? ORDER BY "offset"', (stream,)
            )
            try:
                for o, size in rows:
                    upto, freed = int(o), freed + int(size)
                    if freed >= excess:
                        break
            finally:
                rows.close()
            if upto:
                dropped[stream] = self.trim(stream, upto)
        return dropped

    def close(self) -> None:
        self.store.close()


@dataclass(frozen=True, slots=True)
class StreamSource:
    """One stream of the outbox as :class:`outpost.streams.Source`. ``lost``: told when records of
    the stream are lost before the cloud took them (expired, or asked for again by a cloud side
    that lost them), with why."""

    outbox: Outbox
    stream: str
    lost: Callable[[str], None] | None = None

    def after(self, offset: int, limit: int) -> Records:
        return self.outbox.after(self.stream, offset, limit)

    def trim(self, upto: int) -> None:
        self.outbox.trim(self.stream, upto)

    def last(self) -> int:
        return self.outbox.last(self.stream)

    def expire(self, before_ns: int) -> int:
        if self.stream in NEVER_DROPPED:
            return 0
        n = self.outbox.expire(self.stream, before_ns)
        if n and self.lost is not None:
            self.lost("expired")
        return n

    def snapshot(self) -> int:
        if self.lost is not None:
            self.lost("the cloud side lost the stream")
        return 0  # what the cloud acknowledged is gone from the site: it cannot be made again

    def pending(self, after: int) -> tuple[int, int | None]:
        return self.outbox.pending(self.stream, after)
