"""The gateway's durable outbox, ``outbox.db`` in its state folder: every request is written here
(one transaction per commit) before it is attempted and before its MQTT message is acknowledged;
its outcome is written before its result is published. The key is the primary key: a request sent
again (an agent's resend, a redelivery) finds its row, and gets the stored result if it is settled.

``state``: ``queued`` (waiting, or to be tried again at ``next_ns``), ``done``, ``failed`` (the
endpoint refused it for good, or the retries ran out), ``expired`` (past its age or deadline),
``refused`` (bad input: no such capability, args that do not fit its schema). A request caught
mid-call by a crash is still ``queued`` with the attempts it had, and is tried again at start.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from outpost.store import Store, Sync, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    key TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    connector TEXT NOT NULL,
    capability TEXT NOT NULL,
    args TEXT NOT NULL,
    trace TEXT NOT NULL,
    agent TEXT NOT NULL,
    received_ns INTEGER NOT NULL,
    deadline_ns INTEGER,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_ns INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '',
    result TEXT,
    cost REAL NOT NULL DEFAULT 0,
    settled_ns INTEGER,
    payload BLOB
);
CREATE INDEX IF NOT EXISTS requests_state ON requests (state, received_ns);
CREATE INDEX IF NOT EXISTS requests_trace ON requests (trace);
"""

Statement = tuple[str, Sequence[Any]]
COLUMNS = (
    "key, id, connector, capability, args, trace, agent, received_ns, deadline_ns, state, attempts, "
    "next_ns, detail, result, cost, settled_ns"
)


class Outbox:
    def __init__(self, path: Path, *, synchronous: Sync = "FULL") -> None:
        self.store = Store(path, SCHEMA, synchronous=synchronous)
        self.db = self.store.db

    def commit(self, statements: Iterable[Statement]) -> None:
        with transaction(self.db) as db:
            for sql, params in statements:
                db.execute(sql, params)

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row = self.db.execute(sql, params).fetchone()
        return tuple(row) if row is not None else None

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.store.query(sql, params)

    def close(self) -> None:
        self.store.close()
