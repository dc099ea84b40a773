"""A small helper for durable local state in SQLite (WAL).

State that must survive a crash or power loss lives here, never only in memory. WAL lets readers
run beside the writer; ``synchronous=FULL`` (the default here) survives power loss, ``NORMAL``
survives a process crash and is faster.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

Sync = Literal["OFF", "NORMAL", "FULL"]


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (``BEGIN IMMEDIATE``: the write lock at once, so it never has to be
    upgraded mid-way), committed when the block ends, rolled back if it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def sequence(db: sqlite3.Connection, table: str) -> int:
    """The last key an AUTOINCREMENT ``table`` handed out (0 before the first): it never goes
    back, also when rows are deleted, which is what makes offsets monotonic."""
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    return int(row[0]) if row else 0


class Store:
    """One SQLite database file with WAL on, a schema applied at open, and batched writes."""

    def __init__(self, path: Path, schema: str, *, synchronous: Sync = "FULL") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(schema)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.db.execute(sql, params).fetchall()

    def write_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Write rows in one transaction: one fsync for the lot."""
        with transaction(self.db) as db:
            db.executemany(sql, rows)

    def close(self) -> None:
        self.db.close()
