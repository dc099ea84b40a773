"""Durable per-device sequence state, so duplicates are dropped across restarts.

Only state whose events the broker has confirmed is written: were it written earlier, a crash
between the write and the confirmation would make the redelivered reading look like a duplicate
and it would be lost.
"""

from __future__ import annotations

from pathlib import Path

from outpost.services.ingest.seqtrack import SeqState
from outpost.store import Store, Sync, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS seq_state (
    device TEXT PRIMARY KEY,
    last INTEGER NOT NULL,
    last_ts INTEGER NOT NULL,
    mask BLOB NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY,
    digest BLOB NOT NULL
);
"""


class SeqStore:
    def __init__(self, path: Path, window: int, synchronous: Sync = "FULL") -> None:
        self.window = window
        self._nbytes = (window + 7) // 8
        self.store = Store(path, SCHEMA, synchronous=synchronous)
        columns = {row[1] for row in self.store.query("PRAGMA table_info(seq_state)")}
        if "epoch" not in columns:  # a database from before device counter epochs
            self.store.db.execute("ALTER TABLE seq_state ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0")

    def load(self) -> dict[str, SeqState]:
        rows = self.store.query("SELECT device, last, last_ts, mask, epoch FROM seq_state")
        full = (1 << self.window) - 1
        return {
            d: SeqState(last, ts, int.from_bytes(m, "little") & full, epoch) for d, last, ts, m, epoch in rows
        }

    def save(self, states: dict[str, SeqState], retained: dict[str, bytes] | None = None) -> None:
        """Seq state per device and, where given, the digest of the retained message last
        dead-lettered per topic: one transaction, one fsync."""
        if not states and not retained:
            return
        n = self._nbytes
        with transaction(self.store.db) as db:
            db.executemany(
                "INSERT INTO seq_state(device, last, last_ts, mask, epoch) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(device) DO UPDATE SET "
                "last=excluded.last, last_ts=excluded.last_ts, mask=excluded.mask, epoch=excluded.epoch",
                [(d, s.last, s.last_ts, s.mask.to_bytes(n, "little"), s.epoch) for d, s in states.items()],
            )
            db.executemany(
                "INSERT INTO retained(topic, digest) VALUES (?, ?) "
                "ON CONFLICT(topic) DO UPDATE SET digest=excluded.digest",
                list((retained or {}).items()),
            )

    def load_retained(self) -> dict[str, bytes]:
        """The digest of the retained message last dead-lettered on each topic."""
        return {t: bytes(d) for t, d in self.store.query("SELECT topic, digest FROM retained")}

    def close(self) -> None:
        self.store.close()
