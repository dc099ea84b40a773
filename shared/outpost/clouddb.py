"""The cloud side's database, by URL: PostgreSQL (a fleet of sites) or SQLite (one site, a bench).

Every receiver of the cloud side (the uplink's, memory sync's replica) keeps its tables here beside
the receiver's ledger of :mod:`outpost.streams` (``streams``: per site and stream, the last offset
held and its epoch), so ``outpost cloud run --db URL`` stores every stream of every site in one
database, and ``outpost cloud status`` reads them all from it. Each receiver holds a connection of
its own (it runs on its own network thread).

What differs between the two databases is kept here: the URL, the placeholder (``?`` or ``%s``,
:meth:`CloudDb.q`), a binary column's type (``{blob}`` in a schema statement), how a transaction
is opened, and a lost connection (PostgreSQL restarted): the message being applied raises
:class:`CloudDbError` (a :class:`~outpost.streams.StoreUnavailableError`: nothing committed, the
site sends it again) and the next message makes a new connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import psycopg

from outpost.contracts import StreamBatch
from outpost.errors import OutpostError
from outpost.store import Store
from outpost.streams import (
    RECEIVER_SCHEMA,
    Applied,
    ApplyOne,
    ReceivedStreams,
    Records,
    Sql,
    StoreUnavailableError,
)


class CloudDbError(OutpostError, StoreUnavailableError):
    """The cloud side's database cannot be used (a bad URL, a server that does not answer, a file
    that is not one of its databases)."""


class WrongDatabaseError(CloudDbError):
    """A database that is not the one asked for (``readonly``: a table is missing)."""


class Cur(Protocol):
    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    @property
    def rowcount(self) -> int: ...


class Db(Sql, Protocol):
    """What a receiver uses of a connection (sqlite3's, psycopg 3's)."""

    def execute(self, sql: str, params: Any = ..., /) -> Cur: ...

    def close(self) -> None: ...


Kind = Literal["postgresql", "sqlite"]


class RelaySink(Protocol):
    """Where the cloud side applies the records of a stream relayed inside the uplink's (memory
    sync's, :meth:`outpost.services.memory.replica.ReplicaStore.apply_relayed`): on the uplink's
    connection, in its transaction; the records it refused, (offset, why)."""

    def __call__(
        self, db: Db, site: str, stream: str, epoch: str, start: bool, records: Records
    ) -> list[tuple[int, str]]: ...


def url_kind(url: str) -> Kind:
    """Which database a URL names; :class:`CloudDbError` for any other."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql"
    if url.startswith("sqlite:///"):
        return "sqlite"
    raise CloudDbError(f"the database must be postgresql://... or sqlite:///PATH, got {shown(url)}")


def sqlite_url(path: Path) -> str:
    """The URL of a SQLite file (an absolute path makes four slashes, as SQLAlchemy writes it)."""
    return f"sqlite:///{path}"


class CloudDb:
    """One receiver's connection to the cloud side's database, its tables made (``schema``: one
    statement each; ``{blob}`` is the binary type) unless ``readonly`` (for what only looks: nothing
    is created or written, and each of ``tables`` must exist, or it is not ``what``'s database)."""

    def __init__(
        self,
        url: str,
        schema: Sequence[str],
        *,
        tables: Sequence[str],
        what: str,
        readonly: bool = False,
        savepoints: bool = False,
    ) -> None:
        """``savepoints``: see :class:`~outpost.streams.ReceivedStreams` (False: a record is checked
        before anything of it is written)."""
        self.url = url
        self.url_kind: Kind = url_kind(url)
        self._savepoints = savepoints
        self._store: Store | None = None
        self._broken = False
        self.db: Db
        self.streams: ReceivedStreams[Db]
        blob = "BYTEA" if self.url_kind == "postgresql" else "BLOB"
        statements = [RECEIVER_SCHEMA, *(s.replace("{blob}", blob) for s in schema)]
        try:
            if self.url_kind == "postgresql":
                self._connect()
                if not readonly:
                    for statement in statements:
                        self.db.execute(statement)
            else:
                path = Path(url.removeprefix("sqlite:///"))  # sqlite:////abs or sqlite:///relative
                if readonly:
                    self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
                else:
                    self._store = Store(path, ";\n".join(statements) + ";", synchronous="FULL")
                    self.db = self._store.db
                self.streams = ReceivedStreams(self.db, savepoints=savepoints)
            # a file that is not a database fails here, when its header is read
            self.db.execute(
                "SELECT 1" if self.url_kind == "postgresql" else "SELECT count(*) FROM sqlite_master"
            )
        except (psycopg.Error, sqlite3.Error, OSError) as exc:
            with suppress(Exception):
                self.close()
            raise CloudDbError(f"cannot use the database {shown(url)}: {str(exc).strip()[:300]}") from None
        try:
            for table in ("streams", *tables):
                self.db.execute(f"SELECT count(*) FROM {table}").fetchone()
        except (psycopg.Error, sqlite3.Error) as exc:
            with suppress(Exception):
                self.close()
            raise WrongDatabaseError(
                f"{shown(url)} is not {what}'s database: {str(exc).strip()[:300]}"
            ) from None

    def _connect(self) -> None:
        pg: psycopg.Connection[Any] = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        self.db = cast(Db, pg)
        self.streams = ReceivedStreams(
            self.db, lambda _db: pg.transaction(), paramstyle="format", savepoints=self._savepoints
        )

    def q(self, sql: str) -> str:
        """``sql`` with this driver's placeholder."""
        return sql.replace("?", "%s") if self.url_kind == "postgresql" else sql

    def receive(
        self,
        m: StreamBatch,
        apply_one: ApplyOne[Db],
        *,
        reset: Callable[[Db, StreamBatch], None] | None = None,
        finish: Callable[[Db], None] | None = None,
    ) -> Applied:
        """:meth:`ReceivedStreams.apply` on this database; a failed database raises
        :class:`CloudDbError` (nothing was committed) and the next call connects again."""
        try:
            if self._broken:  # PostgreSQL went away: a new connection for this message
                with suppress(psycopg.Error):
                    self.db.close()
                self._connect()
                self._broken = False
            return self.streams.apply(m, apply_one, reset=reset, finish=finish)
        except (psycopg.OperationalError, psycopg.InterfaceError, sqlite3.OperationalError) as exc:
            self._broken = self.url_kind == "postgresql"
            raise CloudDbError(f"the database failed: {str(exc).strip()[:300]}") from None

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        elif hasattr(self, "db"):
            self.db.close()


def shown(url: str) -> str:
    """A database URL for a message: its password never shown."""
    head, at, tail = url.rpartition("@")
    if at and "://" in head:
        scheme, _, userinfo = head.partition("://")
        user = userinfo.split(":", 1)[0]
        return repr(f"{scheme}://{user}:***@{tail}"[:200] if ":" in userinfo else url[:200])
    return repr(url[:200])
