"""``outpost actions``: what agents asked for and what came of it, from the durable logs (reads only,
safe beside the running services): the gateway's outbox (``connectors/outbox.db``) and the agent
service's log (``agents/agent.db``).

``list`` shows requests with their state; ``trace ID`` shows the chain of one action, one decision
or one reading (its trace id): the reading, the decision and why, the request with its idempotency
key, each attempt's outcome and the peer's answer."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.table import Table

from outpost.cli.output import JsonOpt, print_json, stdout_console
from outpost.cli.site import DataDirOpt, SiteOpt, Where, find_site, group_options
from outpost.errors import ConfigError

actions_app = typer.Typer(help="Action requests and their outcomes: list, trace.", no_args_is_help=True)
actions_app.callback()(group_options)


def _db(path: Path) -> sqlite3.Connection | None:
    if not path.is_file():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.execute("PRAGMA busy_timeout=5000")
    return db


def _rows(db: sqlite3.Connection | None, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    if db is None:
        return []
    cur = db.execute(sql, params)
    names = [c[0] for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _when(ns: int | None) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if ns else "-"


def _open(w: Where) -> tuple[sqlite3.Connection | None, sqlite3.Connection | None]:
    from outpost.services.agent.report import db_path

    outbox = _db(w.site_path("connectors", "outbox.db"))
    agents = _db(db_path(w.data_dir, w.site))
    if outbox is None and agents is None:
        raise w.missing(
            "actions (neither the gateway's outbox nor the agents' log)", w.site_path("connectors")
        )
    return outbox, agents


@actions_app.command("list")
def list_(
    state: Annotated[
        str | None, typer.Option("--state", help="queued, done, failed, expired, refused, duplicate.")
    ] = None,
    connector: Annotated[str | None, typer.Option("--connector", help="Only this connector.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=100_000, help="The newest this many.")] = 50,
    json_out: JsonOpt = False,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """The newest action requests the gateway holds, with their state; and those agents hold that no
    gateway has taken yet (no connector runs, or it is down)."""
    w = find_site(data_dir, site)
    outbox, agents = _open(w)
    where, params = [], []
    for clause, value in (("state = ?", state), ("connector = ?", connector)):
        if value is not None:
            where.append(clause)
            params.append(value)
    sql = (
        "SELECT key, connector, capability, state, attempts, agent, trace, received_ns, settled_ns, "
        "detail, cost "
        "FROM requests"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY received_ns DESC LIMIT ?"
    )
    rows = _rows(outbox, sql, (*params, limit))
    waiting = _rows(
        agents,
        "SELECT a.key, a.connector, a.capability, a.agent, a.trace, a.created_ns, a.attempts FROM actions a "
        "WHERE a.state = 'pending' ORDER BY a.created_ns DESC LIMIT ?",
        (limit,),
    )
    taken = {r["key"] for r in _rows(outbox, "SELECT key FROM requests")} if outbox is not None else set()
    untaken = [r for r in waiting if r["key"] not in taken]
    counts = _rows(outbox, "SELECT connector, state, COUNT(*) AS n FROM requests GROUP BY connector, state")
    if json_out:
        print_json({"requests": rows, "waiting_in_agents": untaken, "counts": counts})
        return
    t = Table(title=f"action requests (newest {len(rows)})")
    for col in ("received (UTC)", "connector", "capability", "state", "tries", "agent", "key", "detail"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(
            _when(r["received_ns"]),
            r["connector"],
            r["capability"],
            r["state"],
            str(r["attempts"]),
            r["agent"],
            r["key"],
            (r["detail"] or "")[:80],
        )
    stdout_console().print(t)
    if counts:
        stdout_console().print(
            "by connector and state: " + ", ".join(f"{c['connector']} {c['state']} {c['n']}" for c in counts)
        )
    if untaken:
        declared = set(w.settings.connectors.declared)
        missing = sorted({r["connector"] for r in untaken} - declared)
        why = (
            f"no connector {', '.join(repr(c) for c in missing)} is declared (connectors.declared, "
            "docs/connectors.md)"
            if missing
            else "is the connectors service running?"
        )
        stdout_console().print(
            f"{len(untaken)} requests wait in the agents' outbox for a gateway "
            f"(re-sent every agents.resend_s; {why})"
        )


@actions_app.command("trace")
def trace(
    ident: Annotated[
        str, typer.Argument(help="An action's key or request id, a decision id, or a reading's trace id.")
    ],
    json_out: JsonOpt = False,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """The chain of one action: the reading (trace), the decision and why, the request and its
    key, the gateway's attempts and the peer's answer, and any escalation on the way."""
    w = find_site(data_dir, site)
    outbox, agents = _open(w)
    trace_id = ident
    for sql in (
        "SELECT trace FROM requests WHERE key = ? OR id = ?",
        "SELECT trace FROM actions WHERE key = ? OR id = ?",
        "SELECT trace FROM decisions WHERE id = ? OR id = ?",
    ):
        for db in (outbox, agents):
            try:
                found = _rows(db, sql, (ident, ident))
            except sqlite3.OperationalError:  # that table is in the other database
                continue
            if found:
                trace_id = found[0]["trace"]
                break
        else:
            continue
        break
    decisions = _rows(
        agents,
        "SELECT id, agent, task, step, kind, capability, args, confidence, reason, ts, outcome, feedback "
        "FROM decisions WHERE trace = ? ORDER BY ts",
        (trace_id,),
    )
    escalations = _rows(
        agents,
        "SELECT decision, agent, question, state, choice, by, created_ns, answered_ns FROM escalations "
        "WHERE trace = ? ORDER BY created_ns",
        (trace_id,),
    )
    asked = _rows(
        agents,
        "SELECT key, decision, connector, capability, created_ns, attempts, state FROM actions "
        "WHERE trace = ? "
        "ORDER BY created_ns",
        (trace_id,),
    )
    done = _rows(
        outbox,
        "SELECT key, connector, capability, args, state, attempts, detail, result, cost, received_ns, "
        "settled_ns "
        "FROM requests WHERE trace = ? ORDER BY received_ns",
        (trace_id,),
    )
    if not (decisions or escalations or asked or done):
        raise ConfigError(f"nothing in the actions' logs for {ident!r} (site {w.site!r}, {w.data_dir})")
    for d in decisions:
        d["args"] = orjson.loads(d["args"])
    for r in done:
        r["args"] = orjson.loads(r["args"])
        r["result"] = orjson.loads(r["result"]) if r["result"] else None
    doc = {
        "trace": trace_id,
        "decisions": decisions,
        "escalations": escalations,
        "requests": asked,
        "outcomes": done,
    }
    if json_out:
        print_json(doc)
        return
    t = Table(title=f"trace {trace_id} (outpost log trace {trace_id} shows the reading's event and scores)")
    t.add_column("UTC", no_wrap=True)
    t.add_column("step", no_wrap=True)
    t.add_column("what", overflow="fold")
    for d in decisions:
        t.add_row(
            _when(d["ts"]),
            f"decision ({d['agent']})",
            f"{d['kind']} {d['capability'] or ''} {orjson.dumps(d['args']).decode()} - {d['reason']}"
            + (f" -> {d['outcome']}" if d["outcome"] else "")
            + f" [id {d['id']}]",
        )
    for e in escalations:
        answer = f"{e['choice']} by {e['by']}" if e["choice"] else e["state"]
        t.add_row(_when(e["created_ns"]), "escalation", f"{e['question']} -> {answer}")
    for a in asked:
        t.add_row(
            _when(a["created_ns"]),
            "request",
            f"{a['capability']} to {a['connector']}, key {a['key']} "
            f"(sent {a['attempts']}x, agent sees {a['state']})",
        )
    for r in done:
        answer = orjson.dumps(r["result"]).decode()[:300] if r["result"] is not None else ""
        t.add_row(
            _when(r["settled_ns"] or r["received_ns"]),
            f"outcome ({r['connector']})",
            f"{r['state']} after {r['attempts']} attempts: {r['detail']} {answer}",
        )
    stdout_console().print(t)


def register(app: typer.Typer) -> None:
    app.add_typer(actions_app, name="actions")
