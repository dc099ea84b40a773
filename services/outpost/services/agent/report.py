"""What the operator's commands read of ``agent.db`` while the service does not run (``outpost
agents list``, ``outpost escalations``): each agent's supervision state and operating figures as
last committed, in the shape of the service's retained ``control/agents/reported``, and its
escalations. Read-only: the file is opened with ``mode=ro`` (safe beside the running service, WAL)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson

from outpost.datadir import site_path
from outpost.services.agent.drift import DriftWatch
from outpost.services.agent.spec import AgentSpec
from outpost.services.agent.supervisor import Governor

FOLDER, DB_NAME = "agents", "agent.db"
"""The service's durable log, in its state folder (``ServiceRuntime.state_dir("agents")``)."""


def db_path(data_dir: Path, site: str) -> Path:
    return site_path(data_dir, site, FOLDER, DB_NAME)


def open_ro(path: Path) -> sqlite3.Connection:
    """agent.db, read-only (never created, never written)."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)


def figures(db: sqlite3.Connection, agent: str) -> dict[str, float]:
    """An agent's operating counts from its decisions, escalations and actions: what the service
    rebuilds at start (and then keeps counting) and what ``outpost agents list`` shows offline."""
    s: dict[str, float] = {
        "decisions": 0,
        "act": 0,
        "escalate": 0,
        "ignore": 0,
        "halt": 0,
        "dry_run": 0,
        "answered": 0,
        "overrides": 0,
        "timeouts": 0,
        "done": 0,
        "failed": 0,
        "cost": 0.0,
    }
    for kind, dry, n in db.execute(
        "SELECT kind, dry_run, COUNT(*) FROM decisions WHERE agent = ? GROUP BY kind, dry_run", (agent,)
    ):
        s["decisions"] += n
        s[kind] = s.get(kind, 0) + n
        if dry:
            s["dry_run"] += n
    for state, choice, purpose, n in db.execute(
        "SELECT state, choice, purpose, COUNT(*) FROM escalations "
        "WHERE agent = ? AND state != 'open' GROUP BY state, choice, purpose",
        (agent,),
    ):
        if state == "timed_out":
            s["timeouts"] += n
        elif purpose == "decide":
            s["answered"] += n
            if choice in ("reject", "edit"):
                s["overrides"] += n
    for state, n, cost in db.execute(
        "SELECT state, COUNT(*), COALESCE(SUM(cost), 0) FROM actions WHERE agent = ? GROUP BY state", (agent,)
    ):
        if state in ("done", "duplicate"):
            s["done"] += n
        elif state in ("failed", "expired", "refused"):
            s["failed"] += n
        s["cost"] += cost
    return s


def open_escalations(db: sqlite3.Connection) -> dict[str, int]:
    """Agent -> escalations waiting for a person."""
    return dict(db.execute("SELECT agent, COUNT(*) FROM escalations WHERE state = 'open' GROUP BY agent"))


def supervision(spec: AgentSpec, gov: Governor, drift: DriftWatch, now: int) -> dict[str, Any]:
    """An agent's entry of ``control/agents/reported``: its state, budgets used, breakers, drift."""
    return {
        "state": gov.state,
        "halted": gov.halted,
        "dry_run": spec.dry_run,
        **gov.used(now),
        "actions_per_minute": spec.limits.actions_per_minute,
        "cost_per_hour": spec.limits.cost_per_hour,
        "breaches": gov.breaches,
        "breakers": gov.open_breakers(now),
        "drift": drift.view(),
    }


def operating(s: dict[str, float], escalations_open: int) -> dict[str, Any]:
    """An agent's entry of ``control/agents/reported``: its operating figures from :func:`figures`."""
    answered, acted, settled = s["answered"], s.get("act", 0), s["done"] + s["failed"]
    return {
        "decisions": int(s["decisions"]),
        "acted": int(acted),
        "escalated": int(s.get("escalate", 0)),
        "escalations_open": escalations_open,
        "answered": int(answered),
        "timeouts": int(s["timeouts"]),
        "override_rate": round(s["overrides"] / answered, 4) if answered else None,
        "success_rate": round(s["done"] / settled, 4) if settled else None,
        "cost": round(s["cost"], 6),
        "cost_per_decision": round(s["cost"] / acted, 6) if acted else None,
    }


def offline(db: sqlite3.Connection, specs: dict[str, AgentSpec], now: int | None = None) -> dict[str, Any]:
    """Each agent's entry of ``control/agents/reported``, from agent.db as last committed (the
    agents the site declares, and any other agent.db knows of)."""
    now = time.time_ns() if now is None else now
    states = {
        name: (gov, drift) for name, gov, drift in db.execute("SELECT name, governor, drift FROM agents")
    }
    opened = open_escalations(db)
    out: dict[str, Any] = {}
    for name in sorted({*specs, *states}):
        spec = specs.get(name)
        entry: dict[str, Any] = {"declared": spec is not None}
        if spec is not None:
            gov, drift = Governor(spec), DriftWatch(spec.drift)
            raw_gov, raw_drift = states.get(name, ("{}", "{}"))
            gov.load(orjson.loads(raw_gov))
            drift.load(orjson.loads(raw_drift))
            entry |= supervision(spec, gov, drift, now)
        out[name] = entry | operating(figures(db, name), int(opened.get(name, 0)))
    return out


ESCALATION_FIELDS = (
    "decision",
    "agent",
    "purpose",
    "question",
    "options",
    "capability",
    "args",
    "trace",
    "created_ns",
    "expires_ns",
    "state",
    "choice",
    "by",
    "note",
    "reply",
    "answered_ns",
)


def escalations(
    db: sqlite3.Connection, *, everything: bool = False, limit: int = 500
) -> list[dict[str, Any]]:
    """Open escalations, oldest first (``everything``: the newest ``limit`` of any state)."""
    cols = ", ".join(ESCALATION_FIELDS)
    if everything:
        sql = f"SELECT {cols} FROM escalations ORDER BY created_ns DESC LIMIT ?"
    else:
        sql = f"SELECT {cols} FROM escalations WHERE state = 'open' ORDER BY created_ns LIMIT ?"
    return [_escalation(row) for row in db.execute(sql, (limit,))]


def escalation(db: sqlite3.Connection, ident: str) -> list[dict[str, Any]]:
    """The escalations whose decision id is ``ident`` or starts with it (an operator types a
    prefix): none, one, or several (ambiguous)."""
    cols = ", ".join(ESCALATION_FIELDS)
    row = db.execute(f"SELECT {cols} FROM escalations WHERE decision = ?", (ident,)).fetchone()
    if row is not None:
        return [_escalation(row)]
    pattern = ident.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    rows = db.execute(f"SELECT {cols} FROM escalations WHERE decision LIKE ? ESCAPE '\\' LIMIT 5", (pattern,))
    return [_escalation(r) for r in rows]


def _escalation(row: tuple[Any, ...]) -> dict[str, Any]:
    doc = dict(zip(ESCALATION_FIELDS, row, strict=True))
    doc["options"] = orjson.loads(doc["options"])
    doc["args"] = orjson.loads(doc["args"])
    return doc
