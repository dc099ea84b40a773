"""``outpost log``: read the operational log (``{data_dir}/sites/{site}/memory/oplog.db``) that
the memory service writes: the newest entries, a replay by offset, time or trace, and the audit of one
reading ("everything that happened because of it"). Reads only; safe beside the running service."""

from __future__ import annotations

import re
import sys
import time
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.table import Table

from outpost.cli.output import stdout_console
from outpost.cli.site import DataDirOpt, SiteOpt, find_site, group_options
from outpost.errors import ConfigError

log_app = typer.Typer(help="The operational log: tail, replay, trace.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per entry, one per line.")]


class Kind(StrEnum):
    """What the log holds (docs/memory.md)."""

    event = "event"
    score = "score"
    dlq = "dlq"
    decision = "decision"
    escalation = "escalation"
    reply = "reply"
    action = "action"
    result = "result"


KindOpt = Annotated[Kind | None, typer.Option("--kind", help="Only entries of this kind.")]


log_app.callback()(group_options)


def _open(data_dir: Path | None, site: str | None) -> Any:
    from outpost.services.memory.oplog import OpLog

    w = find_site(data_dir, site)
    path = w.site_path("memory", "oplog.db")
    if not path.is_file():
        raise w.missing("operational log", path)
    return OpLog(path, synchronous="NORMAL")


_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def when_ns(value: str | None, what: str, now_ns: int | None = None) -> int | None:
    """Epoch nanoseconds from an ISO 8601 time (UTC unless it says otherwise), a time relative to
    now (``-30m``, ``-1h``, ``-2d``, ``-90s``) or an integer (epoch ns)."""
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    rel = _RELATIVE.match(value.strip())
    if rel:
        now = time.time_ns() if now_ns is None else now_ns
        return now - int(float(rel.group(1)) * _UNIT_S[rel.group(2)] * 1e9)
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"{what} must be ISO 8601 (2026-12-01T20:00:00), relative (-30m, -1h, -2d) or epoch ns, "
            f"got {value!r}"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1e9)


def _body(entry: Any) -> Any:
    """The entry's message as JSON, one item per entry: the memory service keeps a message of one
    event or score as it came (a list of one), which is shown unwrapped, so every entry of a kind
    has one shape; bytes that are not JSON as text."""
    try:
        body: Any = orjson.loads(entry.body)
    except orjson.JSONDecodeError:
        return entry.body.decode("utf-8", "replace")
    if isinstance(body, list) and len(body) == 1:
        return body[0]
    return body


def _summary(entry: Any) -> str:
    """The body column: a dead letter's stage, reason and detail first (what an operator looks
    for), anything else as its JSON."""
    body = _body(entry)
    if entry.kind == "dlq" and isinstance(body, dict):
        return f"{body.get('stage', '?')}: {body.get('reason', '?')}: {body.get('detail', '')}"
    return body if isinstance(body, str) else orjson.dumps(body).decode()


def _doc(entry: Any) -> dict[str, Any]:
    body = _body(entry)
    return {
        "offset": entry.offset,
        "ts": entry.ts,
        "at": entry.at,
        "kind": entry.kind,
        "trace": entry.trace,
        "topic": entry.topic,
        "body": body,
    }


def _show(entries: list[Any], json_out: bool, title: str) -> None:
    if json_out:
        for e in entries:
            sys.stdout.write(orjson.dumps(_doc(e)).decode() + "\n")
        return
    t = Table(title=f"{title} ({len(entries)} entries)")
    # at 80 columns the trace and topic (one column, a line each) give way to the body: a dead
    # letter's reason is in it
    t.add_column("offset", no_wrap=True)
    t.add_column("UTC", no_wrap=True)
    t.add_column("kind", no_wrap=True)
    t.add_column("trace / topic", no_wrap=True, overflow="ellipsis", max_width=18)
    t.add_column("body (dlq: stage: reason: detail)", overflow="fold", min_width=20)
    today = datetime.now(UTC).date()
    for e in entries:
        at = datetime.fromtimestamp(e.ts / 1e9, UTC)
        when = at.strftime("%H:%M:%S.%f")[:-3] if at.date() == today else at.strftime("%Y-%m-%d %H:%M")
        t.add_row(
            str(e.offset),
            when,
            e.kind,
            f"{e.trace}\n{e.topic.split('/', 3)[-1]}",
            _summary(e)[:160],
        )
    stdout_console().print(t)


@log_app.command("tail")
def tail(
    n: Annotated[int, typer.Option("-n", "--lines", min=1, max=100_000, help="How many entries.")] = 20,
    kind: KindOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new entries (Ctrl-C stops).")
    ] = False,
    json_out: JsonOpt = False,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """The newest entries."""
    oplog = _open(data_dir, site)
    entries = oplog.tail(n, kind)
    _show(entries, json_out, "newest")
    if not follow:
        return
    last = entries[-1].offset if entries else oplog.last_offset
    try:
        while True:
            time.sleep(0.5)
            batch = oplog.read(last, limit=10_000)
            if batch:
                last = batch[-1].offset
            new = [e for e in batch if kind is None or e.kind == kind]
            if new:
                _show(new, json_out, "new")
    except KeyboardInterrupt:
        return


@log_app.command("replay")
def replay(
    from_offset: Annotated[int | None, typer.Option("--from", min=1, help="First offset.")] = None,
    to_offset: Annotated[int | None, typer.Option("--to", min=1, help="Last offset.")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="From this origin time (ISO 8601 UTC, -1h, or epoch ns).")
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help="Before this origin time.")] = None,
    trace: Annotated[str | None, typer.Option("--trace", help="Only this trace id.")] = None,
    kind: KindOpt = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many entries.")] = 10_000,
    json_out: JsonOpt = False,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """Entries by offset range, origin-time range, trace and kind, in offset order."""
    if from_offset is not None and to_offset is not None and to_offset < from_offset:
        raise ConfigError(f"--to {to_offset} is before --from {from_offset}")
    entries = _open(data_dir, site).replay(
        from_offset=from_offset,
        to_offset=to_offset,
        since_ns=when_ns(since, "--since"),
        until_ns=when_ns(until, "--until"),
        trace=trace,
        kind=kind,
        limit=limit,
    )
    _show(entries, json_out, "replay")


@log_app.command("trace")
def trace(
    trace_id: Annotated[str, typer.Argument(help="The id of a reading (an event's trace).")],
    json_out: JsonOpt = False,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """Everything that happened because of one reading: its event, its scores, the agents'
    decisions, escalations and replies, action requests and results, any dead letter."""
    entries = _open(data_dir, site).trace(trace_id)
    if not entries:
        raise ConfigError(f"nothing in the log carries trace {trace_id!r}")
    _show(entries, json_out, f"trace {trace_id}")


def register(app: typer.Typer) -> None:
    app.add_typer(log_app, name="log")
