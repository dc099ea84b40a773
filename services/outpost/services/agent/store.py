"""The agent service's durable log, ``agent.db`` in its state folder: every decision, escalation and
action request, with its trace id, is written here (one transaction per commit, ``transaction``)
before it is published, so nothing takes effect that a restart would not know about.

Tables:

* ``decisions``: what each agent decided, why, on which input (``input``, ``step``: the id of a
  decision is derived from them, so a redelivered input is decided once), its task, and what came
  of it (``outcome``: the action's result, a person's answer);
* ``escalations``: questions to a person, open until answered or timed out (``state``);
* ``actions``: the outbox, each request's bytes kept until its result arrives, re-sent meanwhile;
* ``agents``: each agent's supervision, policy and drift state (JSON), committed with its decisions;
* ``batched``: asks collected for one batched action (customer messages), not yet decided;
* ``features``: each device's last value per sensed metric;
* ``runs``: each start and how long it took to resume what was pending (mean time to recovery).
"""

from __future__ import annotations

from pathlib import Path

from outpost.store import Store, Sync

SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    task TEXT NOT NULL,
    step INTEGER NOT NULL,
    kind TEXT NOT NULL,
    capability TEXT,
    args TEXT NOT NULL,
    confidence REAL NOT NULL,
    reason TEXT NOT NULL,
    trace TEXT NOT NULL,
    input TEXT NOT NULL,
    input_ts INTEGER NOT NULL,
    rule TEXT NOT NULL,
    dry_run INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    outcome TEXT,
    feedback TEXT,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_agent_ts ON decisions (agent, ts);
CREATE INDEX IF NOT EXISTS decisions_task ON decisions (task);
CREATE INDEX IF NOT EXISTS decisions_trace ON decisions (trace);
CREATE INDEX IF NOT EXISTS decisions_ts ON decisions (ts);
CREATE TABLE IF NOT EXISTS escalations (
    decision TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    purpose TEXT NOT NULL,
    question TEXT NOT NULL,
    options TEXT NOT NULL,
    capability TEXT,
    args TEXT NOT NULL,
    trace TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    expires_ns INTEGER NOT NULL,
    state TEXT NOT NULL,
    choice TEXT,
    by TEXT,
    note TEXT,
    reply TEXT,
    answered_ns INTEGER,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS escalations_open ON escalations (state, expires_ns);
CREATE INDEX IF NOT EXISTS escalations_closed ON escalations (created_ns) WHERE state != 'open';
CREATE TABLE IF NOT EXISTS actions (
    key TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    decision TEXT NOT NULL,
    agent TEXT NOT NULL,
    connector TEXT NOT NULL,
    capability TEXT NOT NULL,
    device TEXT NOT NULL,
    trace TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    sent_ns INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    state TEXT NOT NULL,
    detail TEXT,
    cost REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS actions_pending ON actions (state, sent_ns);
CREATE INDEX IF NOT EXISTS actions_settled ON actions (created_ns) WHERE state != 'pending';
CREATE INDEX IF NOT EXISTS actions_decision ON actions (decision);
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    governor TEXT NOT NULL,
    policy TEXT NOT NULL,
    drift TEXT NOT NULL,
    control TEXT
);
CREATE TABLE IF NOT EXISTS batched (
    agent TEXT NOT NULL,
    rule TEXT NOT NULL,
    capability TEXT NOT NULL,
    input TEXT NOT NULL,
    trace TEXT NOT NULL,
    ts INTEGER NOT NULL,
    args TEXT NOT NULL,
    confidence REAL NOT NULL DEFAULT 1.0,
    PRIMARY KEY (agent, rule, capability, input)
);
CREATE TABLE IF NOT EXISTS runs (
    started_ns INTEGER PRIMARY KEY,
    recovered_ms REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS features (
    device TEXT PRIMARY KEY,
    "values" TEXT NOT NULL
);
"""

FORGET = (
    "DELETE FROM actions WHERE created_ns < ? AND state != 'pending'",
    "DELETE FROM escalations WHERE created_ns < ? AND state != 'open'",
    "DELETE FROM decisions WHERE ts < ? AND id NOT IN (SELECT decision FROM actions) "
    "AND id NOT IN (SELECT decision FROM escalations)",
)
"""Retention (``agents.retention_s``), each with the cutoff: what is settled and old goes; an open
escalation, a pending action and the decisions they belong to stay however old. They run in the
agent service's commit on its network thread, so each reads what it deletes through an index
(actions_settled, escalations_closed, decisions_ts, actions_decision for the NOT IN): without them
the three scanned their tables, ~109 ms a minute at 100,000 rows each (tests/unit/test_upkeep_plans.py)."""


def open_agent_db(path: Path, *, synchronous: Sync = "FULL") -> Store:
    """agent.db, its schema applied (commit, one, query: :class:`outpost.store.Store`)."""
    return Store(path, SCHEMA, synchronous=synchronous)
