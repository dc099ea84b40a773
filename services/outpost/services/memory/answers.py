"""The answers of memory's requests with effects, kept to answer a redelivered copy (SQLite, WAL).

A request is known by its response topic and correlation data. Its answer is recorded right after
its effect, before the reply is published: a copy the broker redelivers (after a missed keepalive,
or a kill -9 of memory before the request was acknowledged) is answered from here and not run
again, so a ``checkpoint-save`` or an ``ltm-add`` takes effect once. What is left is the instant
between the effect's commit and this record's.

At most ``keep`` answers are kept, for at most ``max_age_s`` (a broker redelivers within a session's
expiry, not days later). A record that cannot be written (a full disk) is kept in memory alone.
Any thread may call it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from pathlib import Path

from outpost.store import DiskFull, Store, transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key BLOB PRIMARY KEY,
    at_ns INTEGER NOT NULL,
    answer BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS answers_at ON answers (at_ns);
"""

Key = tuple[str, bytes]


def _digest(key: Key) -> bytes:
    return hashlib.sha256(key[0].encode() + b"\0" + key[1]).digest()


class Answers:
    def __init__(self, path: Path, *, keep: int = 10_000, max_age_s: float = 86_400.0) -> None:
        self.store = Store(path, _SCHEMA, synchronous="NORMAL")
        self.keep = keep
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._unsaved: OrderedDict[bytes, bytes] = OrderedDict()
        self._puts = 0

    def get(self, key: Key) -> bytes | None:
        digest = _digest(key)
        with self._lock:
            if digest in self._unsaved:
                return self._unsaved[digest]
            row = self.store.db.execute("SELECT answer FROM answers WHERE key = ?", (digest,)).fetchone()
        return bytes(row[0]) if row else None

    def put(self, key: Key, answer: bytes) -> None:
        digest = _digest(key)
        now = time.time_ns()
        with self._lock:
            try:
                with transaction(self.store.db) as db:
                    db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)", (digest, now, answer))
                    self._puts += 1
                    if self._puts % 100 == 0:
                        self._prune(now)
            except DiskFull:
                self._unsaved[digest] = answer
                while len(self._unsaved) > self.keep:
                    self._unsaved.popitem(last=False)

    def _prune(self, now: int) -> None:
        db = self.store.db
        db.execute("DELETE FROM answers WHERE at_ns < ?", (now - int(self.max_age_s * 1e9),))
        db.execute(
            "DELETE FROM answers WHERE at_ns < "
            "(SELECT at_ns FROM answers ORDER BY at_ns DESC LIMIT 1 OFFSET ?)",
            (self.keep,),
        )

    def __len__(self) -> int:
        with self._lock:
            return int(self.store.db.execute("SELECT count(*) FROM answers").fetchone()[0]) + len(
                self._unsaved
            )

    def close(self) -> None:
        self.store.close()
