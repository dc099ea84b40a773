"""A small helper for durable local state in SQLite (WAL).

State that must survive a crash or power loss lives here, never only in memory. WAL lets readers
run beside the writer; ``synchronous=FULL`` (the default here) survives power loss, ``NORMAL``
survives a process crash and is faster.

A full disk is recognised here, once, for every service: a write that fails for space
(``SQLITE_FULL``, ``ENOSPC``) raises :class:`DiskFull`, with nothing of its transaction written,
and the database is remembered as full until one of its writes succeeds again
(:func:`full_databases`, which the service kit reads to report ``health: degraded``, ``disk full``;
:mod:`outpost.disk`). The WAL is kept from holding on to space: ``journal_size_limit`` truncates it
after a checkpoint, and :meth:`Store.checkpoint` gives it back at once (after a write that failed
for space, the space a retry needs is twice its size: once in the WAL, once in the database).
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal

from outpost.errors import OutpostError

Sync = Literal["OFF", "NORMAL", "FULL"]

WAL_LIMIT_BYTES = 4 * 1024 * 1024
"""What a WAL keeps of its size once checkpointed (``PRAGMA journal_size_limit``)."""


class DiskFull(OutpostError):  # noqa: N818 (named for what the operator sees: "disk full")
    """A write failed because the disk under the database is full (SQLITE_FULL, ENOSPC). Nothing of
    the transaction was written: retry it once space is freed."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"disk full: {path}: {detail}")
        self.path = path
        self.detail = detail


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk is full: SQLite's SQLITE_FULL, or ENOSPC / EDQUOT."""
    if isinstance(exc, DiskFull):
        return True
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return (code is not None and code & 0xFF == sqlite3.SQLITE_FULL) or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


_full: dict[str, str] = {}
"""Database files whose last write failed for space (path -> why): any thread writes it."""
_full_lock = threading.Lock()


def full_databases(under: Path | None = None) -> dict[str, str]:
    """The databases (under a folder, or all) whose last write failed for space, and why. The
    service kit asks on every tick: with no full database (the common case) it costs nothing."""
    if not _full:
        return {}
    with _full_lock:
        items = list(_full.items())
    if under is None:
        return dict(items)
    root = str(under.resolve())
    return {p: why for p, why in items if p == root or p.startswith(root + "/")}


def _path_of(db: sqlite3.Connection) -> str:
    try:
        for _, name, file in db.execute("PRAGMA database_list"):
            if name == "main":
                return str(Path(file).resolve()) if file else ":memory:"
    except sqlite3.Error:
        pass
    return "?"


def _disk_full(db: sqlite3.Connection, exc: BaseException) -> DiskFull:
    path = _path_of(db)
    with _full_lock:
        _full[path] = str(exc)
    return DiskFull(path, str(exc))


def _wrote(db: sqlite3.Connection) -> None:
    if _full:  # only after a failure: the path costs a query
        path = _path_of(db)
        with _full_lock:
            _full.pop(path, None)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (``BEGIN IMMEDIATE``: the write lock at once, so it never has to be
    upgraded mid-way), committed when the block ends, rolled back if it raises. A failure for
    space raises :class:`DiskFull` (SQLite may already have rolled back by itself: the rollback
    here is only done when a transaction is still open, so the real error is what surfaces)."""
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    except (sqlite3.Error, OSError) as exc:
        if db.in_transaction:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        if is_disk_full(exc):
            raise _disk_full(db, exc) from exc
        raise
    _wrote(db)


def log_failed_commit(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """A service's commit that failed and will be tried again, said once: a full disk in one line
    (no traceback: the log may be on that very disk), anything else with its traceback. Call it
    from the ``except`` block."""
    if isinstance(exc, DiskFull):
        logger.error(f"{what} commit failed: disk full; retrying", extra={"error": str(exc)})
    else:
        logger.exception(f"{what} commit failed; retrying")


def sequence(db: sqlite3.Connection, table: str) -> int:
    """The last key an AUTOINCREMENT ``table`` handed out (0 before the first): it never goes
    back, also when rows are deleted, which is what makes offsets monotonic."""
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    return int(row[0]) if row else 0


Statement = tuple[str, Sequence[Any]]
"""One SQL statement and its parameters, to run in a :meth:`Store.commit`."""


class Store:
    """One SQLite database file with WAL on, a schema applied at open, and batched writes."""

    def __init__(self, path: Path, schema: str, *, synchronous: Sync = "FULL") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={synchronous}")
            self.db.execute("PRAGMA busy_timeout=5000")
            self.db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
            self.db.executescript(schema)
        except sqlite3.Error as exc:
            if is_disk_full(exc):
                self.db.close()
                raise DiskFull(str(path), f"cannot open: {exc}") from exc
            raise

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.db.execute(sql, params).fetchall()

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """The first row, or None."""
        row = self.db.execute(sql, params).fetchone()
        return tuple(row) if row is not None else None

    def commit(self, statements: Iterable[Statement]) -> None:
        """Statements in one transaction (one fsync): what a service's commit has collected (the
        agent service's decisions, the gateway's outbox)."""
        with transaction(self.db) as db:
            for sql, params in statements:
                db.execute(sql, params)

    def write_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Write rows in one transaction: one fsync for the lot."""
        with transaction(self.db) as db:
            db.executemany(sql, rows)

    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it: what a write that failed for space
        left in the WAL is given back, and the next write finds room. Raises DiskFull when even
        that has no room (the database must grow by what the WAL holds)."""
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            if is_disk_full(exc):
                raise _disk_full(self.db, exc) from exc
            raise

    def close(self) -> None:
        self.db.close()
