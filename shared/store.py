"""A small helper for durable local state in SQLite (WAL).

State that must survive a crash or power loss lives here, never only in memory. WAL lets readers
run beside the writer; ``synchronous=FULL`` (the default here) survives power loss, ``NORMAL``
survives a process crash and is faster.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

Sync = Literal["OFF", "NORMAL", "FULL"]


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
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(sql, rows)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()
