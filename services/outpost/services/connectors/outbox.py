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

from pathlib import Path

from outpost.store import Store, Sync

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
CREATE INDEX IF NOT EXISTS requests_settled ON requests (settled_ns) WHERE state != 'queued';
"""

FORGET = "DELETE FROM requests WHERE state != 'queued' AND settled_ns < ?"
"""Settled requests older than the retention (``connectors.retention_s``) leave the outbox; queued
ones stay however old. It reads what it deletes through ``requests_settled`` (a partial index that
a request enters when it settles, so intake writes no more than before): the minute's upkeep runs
on the gateway's network thread, and a scan of a month's requests there held up every request
behind it (15 ms at 100,000 rows on the 2-core machine, growing with the table)."""


def open_outbox(path: Path, *, synchronous: Sync = "FULL") -> Store:
    """outbox.db, its schema applied (commit, one, query: :class:`outpost.store.Store`)."""
    return Store(path, SCHEMA, synchronous=synchronous)
