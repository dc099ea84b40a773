"""The operational log: append-only, durable, with monotonic offsets, in SQLite (WAL).

What happened on a site (every event, score, dead letter, later every decision and action) is
appended here in batches, one transaction each, so that a reader can consume from an offset and
resume after a restart, anything can be replayed by offset, time range or trace id, and "everything
that happened because of reading X" is one indexed query.

Durability: ``synchronous=FULL`` by default: a committed batch survives a power loss (SQLite
fsyncs the WAL on commit). ``NORMAL`` survives a process crash, not a power loss, and is faster.

Retention: :meth:`OpLog.compact` removes entries older than ``max_age_s`` and, while the file is
over ``max_bytes``, the oldest entries, but never an entry a registered consumer has not
acknowledged, unless the disk budget leaves no other choice: then it is removed anyway, counted in
``forced`` and reported, because a full disk would stop the whole site.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from outpost.errors import OutpostError
from outpost.store import Store, sequence, transaction

Sync = Literal["OFF", "NORMAL", "FULL"]

_SCHEMA = """
PRAGMA auto_vacuum = INCREMENTAL;
CREATE TABLE IF NOT EXISTS log (
    "offset" INTEGER PRIMARY KEY AUTOINCREMENT,
    ts INTEGER NOT NULL,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    trace TEXT NOT NULL,
    topic TEXT NOT NULL,
    body BLOB NOT NULL,
    mid TEXT
);
CREATE INDEX IF NOT EXISTS log_trace ON log (trace);
CREATE INDEX IF NOT EXISTS log_ts ON log (ts);
CREATE TABLE IF NOT EXISTS consumers (
    name TEXT PRIMARY KEY,
    acked INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS stats (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


class LogError(OutpostError):
    """The log file cannot be used, or a request to it is invalid."""


@dataclass(frozen=True, slots=True)
class Record:
    """What is appended: ``ts`` is the origin's epoch ns, ``trace`` the id of the reading that
    started the chain, ``kind`` what it is (event, score, dlq, ...)."""

    ts: int
    kind: str
    trace: str
    topic: str
    body: bytes
    mid: str | None = None
    """The message's own id (its envelope ``id``), where it has one: an entry whose id is already
    in the log is not appended again (a message redelivered after a crash between the commit and
    its acknowledgement, a dead letter a service sent twice across a reconnect)."""


@dataclass(frozen=True, slots=True)
class Entry:
    offset: int
    ts: int
    at: int
    kind: str
    trace: str
    topic: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Compaction:
    removed: int
    forced: int
    """Entries removed although a consumer had not acknowledged them (the budget forced it)."""
    bytes_before: int
    bytes_after: int


_COLUMNS = 'SELECT "offset", ts, at, kind, trace, topic, body FROM log'


class OpLog:
    def __init__(self, path: Path, *, synchronous: Sync = "FULL") -> None:
        self.path = path
        self.duplicates = 0
        """Records left out of :meth:`append` because their message id was already logged."""
        try:
            self.store = Store(path, _SCHEMA, synchronous=synchronous)
        except sqlite3.DatabaseError as exc:
            raise LogError(f"operational log {path} cannot be used ({exc})") from None
        self.db = self.store.db
        self._add_message_ids()

    def _add_message_ids(self) -> None:
        """Give a log written before message ids were kept its ``mid`` column and unique index
        (older entries have none, so they never collide)."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(log)")}
        with transaction(self.db) as db:
            if "mid" not in columns:
                db.execute("ALTER TABLE log ADD COLUMN mid TEXT")
            db.execute("CREATE UNIQUE INDEX IF NOT EXISTS log_mid ON log (mid) WHERE mid IS NOT NULL")

    def close(self) -> None:
        self.store.close()

    # --- writing ---------------------------------------------------------------------------------
    def append(self, records: Sequence[Record]) -> tuple[int, int]:
        """Append a batch in one transaction (one fsync under FULL); the first and last offsets
        given, or (0, 0) when nothing was appended. A record whose ``mid`` is already in the log,
        or earlier in the batch, is left out (:attr:`duplicates` counts them); the others take
        consecutive offsets. Offsets only ever grow, also across deletions."""
        now = time.time_ns()
        with transaction(self.db) as db:
            fresh = self._unlogged(db, records)
            if not fresh:
                return (0, 0)
            db.executemany(
                "INSERT INTO log (ts, at, kind, trace, topic, body, mid) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(r.ts, now, r.kind, r.trace, r.topic, r.body, r.mid) for r in fresh],
            )
            last = sequence(db, "log")
        return (last - len(fresh) + 1, last)

    def _unlogged(self, db: sqlite3.Connection, records: Sequence[Record]) -> Sequence[Record]:
        """``records`` less those whose message id is logged already. Looked up before the insert
        (an ``INSERT OR IGNORE`` would still use up an offset for each row it leaves out)."""
        mids = [r.mid for r in records if r.mid is not None]
        if not mids:
            return records
        seen: set[str] = set()
        for i in range(0, len(mids), 500):  # under SQLite's limit on bound parameters
            part = mids[i : i + 500]
            marks = ",".join("?" * len(part))
            seen.update(row[0] for row in db.execute(f"SELECT mid FROM log WHERE mid IN ({marks})", part))
        fresh: list[Record] = []
        for r in records:
            if r.mid is not None:
                if r.mid in seen:
                    continue
                seen.add(r.mid)
            fresh.append(r)
        self.duplicates += len(records) - len(fresh)
        return fresh

    # --- reading ---------------------------------------------------------------------------------
    def read(self, after: int, limit: int = 1000) -> list[Entry]:
        """Entries with an offset above ``after``, oldest first."""
        rows = self.db.execute(_COLUMNS + ' WHERE "offset" > ? ORDER BY "offset" LIMIT ?', (after, limit))
        return [Entry(*r) for r in rows]

    def tail(self, n: int = 20, kind: str | None = None) -> list[Entry]:
        """The newest ``n`` entries (of one kind), oldest first."""
        if kind is None:
            rows = self.db.execute(_COLUMNS + ' ORDER BY "offset" DESC LIMIT ?', (n,)).fetchall()
        else:
            rows = self.db.execute(
                _COLUMNS + ' WHERE kind = ? ORDER BY "offset" DESC LIMIT ?', (kind, n)
            ).fetchall()
        return [Entry(*r) for r in reversed(rows)]

    def replay(
        self,
        *,
        from_offset: int | None = None,
        to_offset: int | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
        trace: str | None = None,
        kind: str | None = None,
        limit: int = 100_000,
    ) -> list[Entry]:
        """Entries in an offset range, an origin-time range (``since`` inclusive, ``until``
        exclusive), of one trace and/or one kind, in offset order."""
        where: list[str] = []
        args: list[object] = []
        for clause, value in (
            ('"offset" >= ?', from_offset),
            ('"offset" <= ?', to_offset),
            ("ts >= ?", since_ns),
            ("ts < ?", until_ns),
            ("trace = ?", trace),
            ("kind = ?", kind),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = _COLUMNS + (" WHERE " + " AND ".join(where) if where else "") + ' ORDER BY "offset" LIMIT ?'
        return [Entry(*r) for r in self.db.execute(sql, (*args, limit))]

    def trace(self, trace_id: str) -> list[Entry]:
        """Everything that happened because of one reading: every entry that carries its trace."""
        return self.replay(trace=trace_id)

    def summary(self, after: int, upto: int) -> dict[str, object]:
        """What the entries in (``after``, ``upto``] amount to, without reading their bodies: how
        many of each kind, and of each topic (a device's events, a model's scores per device, a
        stage's dead letters), and the origin-time span. What goes to the cloud instead of the
        log itself."""
        rows = self.db.execute(
            'SELECT kind, topic, count(*), min(ts), max(ts) FROM log WHERE "offset" > ? AND '
            '"offset" <= ? GROUP BY kind, topic',
            (after, upto),
        ).fetchall()
        by_kind: dict[str, int] = {}
        by_topic: dict[str, int] = {}
        for kind, topic, n, _, _ in rows:
            by_kind[kind] = by_kind.get(kind, 0) + int(n)
            by_topic[topic] = by_topic.get(topic, 0) + int(n)
        return {
            "from_offset": after,
            "to_offset": upto,
            "entries": sum(by_kind.values()),
            "first_ts": min((int(r[3]) for r in rows), default=None),
            "last_ts": max((int(r[4]) for r in rows), default=None),
            "by_kind": by_kind,
            "by_topic": by_topic,
        }

    @property
    def last_offset(self) -> int:
        return sequence(self.db, "log")

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM log").fetchone()[0])

    # --- consumers -------------------------------------------------------------------------------
    def register(self, consumer: str) -> int:
        """Make ``consumer`` known (its entries are then kept until it acknowledges them); where it
        stands: the last offset it acknowledged."""
        self.db.execute(
            "INSERT OR IGNORE INTO consumers (name, acked, updated_ns) VALUES (?, 0, ?)",
            (consumer, time.time_ns()),
        )
        return self.position(consumer)

    def position(self, consumer: str) -> int:
        row = self.db.execute("SELECT acked FROM consumers WHERE name = ?", (consumer,)).fetchone()
        if row is None:
            raise LogError(f"unknown consumer {consumer!r} (register it first)")
        return int(row[0])

    def ack(self, consumer: str, offset: int) -> None:
        """``consumer`` has processed everything up to ``offset``; an acknowledgement never moves
        back (a replayed old ack is harmless)."""
        if offset > self.last_offset:
            raise LogError(f"{consumer}: cannot acknowledge {offset}, the log ends at {self.last_offset}")
        self.position(consumer)
        self.db.execute(
            "UPDATE consumers SET acked = max(acked, ?), updated_ns = ? WHERE name = ?",
            (offset, time.time_ns(), consumer),
        )

    def consumers(self) -> dict[str, int]:
        return {str(n): int(a) for n, a in self.db.execute("SELECT name, acked FROM consumers")}

    def forget(self, consumer: str) -> None:
        self.db.execute("DELETE FROM consumers WHERE name = ?", (consumer,))

    # --- retention -------------------------------------------------------------------------------
    def size_bytes(self) -> int:
        page = int(self.db.execute("PRAGMA page_size").fetchone()[0])
        pages = int(self.db.execute("PRAGMA page_count").fetchone()[0])
        free = int(self.db.execute("PRAGMA freelist_count").fetchone()[0])
        return (pages - free) * page

    def compact(self, *, max_age_s: float | None = None, max_bytes: int | None = None) -> Compaction:
        """Remove what retention allows (see the module docstring) and give the space back."""
        before = self.size_bytes()
        acked = self.consumers()
        safe = min(acked.values()) if acked else self.last_offset
        removed = forced = 0
        if max_age_s is not None:
            cutoff = time.time_ns() - int(max_age_s * 1e9)
            removed += self.db.execute(
                'DELETE FROM log WHERE ts < ? AND "offset" <= ?', (cutoff, safe)
            ).rowcount
        if max_bytes is not None:
            removed_b, forced = self._to_budget(max_bytes, safe)
            removed += removed_b
        self.db.execute("PRAGMA incremental_vacuum")
        if forced:
            self.db.execute(
                "INSERT INTO stats (key, value) VALUES ('forced', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                (forced,),
            )
        return Compaction(removed, forced, before, self.size_bytes())

    def _to_budget(self, max_bytes: int, safe: int) -> tuple[int, int]:
        """Remove the oldest entries until the file fits ``max_bytes``: acknowledged ones first
        (they are the oldest), then, if it must, unacknowledged ones (counted as forced)."""
        removed = forced = 0
        while self.size_bytes() > max_bytes:
            lo, n = self.db.execute('SELECT min("offset"), count(*) FROM log').fetchone()
            if lo is None:
                break
            upto = int(lo) + max(100, int(n) // 10) - 1  # a tenth of what is left at a time
            forced += int(
                self.db.execute(
                    'SELECT count(*) FROM log WHERE "offset" > ? AND "offset" <= ?', (safe, upto)
                ).fetchone()[0]
            )
            removed += self.db.execute('DELETE FROM log WHERE "offset" <= ?', (upto,)).rowcount
            self.db.execute("PRAGMA incremental_vacuum")
        return removed, forced

    def forced_total(self) -> int:
        """Unacknowledged entries removed by the disk budget, ever."""
        row = self.db.execute("SELECT value FROM stats WHERE key = 'forced'").fetchone()
        return int(row[0]) if row else 0
