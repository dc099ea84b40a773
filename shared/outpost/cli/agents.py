"""The operator's side of the agent service (docs/agents.md): ``outpost agents`` (see them; stop,
pause, resume), ``outpost escalations`` (answer what they ask a person) and ``outpost replay``
(shadow evaluation of a policy over the recorded log).

The running site is reached through its broker: the switch is the retained
``control/agents/desired`` document (built with :func:`~outpost.services.agent.supervisor.command`
from the current one, so one agent's stop keeps another's pause), what the agents report is the
retained ``control/agents/reported``, and a person's answer is an
:class:`~outpost.contracts.EscalationReply` on the escalation's reply topic. What is recorded is read
from the site's ``agent.db`` (read-only) and the memory service's log."""

from __future__ import annotations

import getpass
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from outpost.broker import port_open
from outpost.bus import Bus, Message
from outpost.cli.log import when_ns
from outpost.cli.output import JsonOpt, print_json, stdout_console
from outpost.cli.progress import Phases
from outpost.cli.site import DataDirOpt, SiteBrokerOpt, SiteOpt, Where, find_site, group_options
from outpost.contracts import AgentsControl, header, validation_summary
from outpost.errors import BrokerError, ConfigError

T = TypeVar("T")

agents_app = typer.Typer(help="The site's agents: list, stop, pause, resume.", no_args_is_help=True)
escalations_app = typer.Typer(
    help="What agents ask a person: list, approve, reject, edit.", no_args_is_help=True
)
agents_app.callback()(group_options)
escalations_app.callback()(group_options)

NameArg = Annotated[str | None, typer.Argument(help="The agent (or --all).", show_default=False)]
AllOpt = Annotated[bool, typer.Option("--all", help="Every agent of the site.")]
WaitOpt = Annotated[
    float, typer.Option("--wait", min=0, help="Seconds to wait for the agent service to confirm.")
]
RETAINED_WAIT_S = 1.0
"""How long a retained message may take to arrive after the subscription is acknowledged."""


# --- where things are ------------------------------------------------------------------------------
def _db(where: Where) -> Any:
    from outpost.services.agent.report import db_path, open_ro

    path = db_path(where.data_dir, where.site)
    if not path.is_file():
        raise where.missing("agent log (agent.db)", path)
    return open_ro(path)


def _need_broker(where: Where) -> None:
    if not port_open(where.settings.mqtt.host, where.settings.mqtt.port, timeout=2):
        raise BrokerError(
            f"no broker at {where.broker} (from {where.broker_from}) for site {where.site!r}: the site does "
            f"not run ({where.running()}). Start it with `outpost up`, or give --broker HOST:PORT or "
            "the --data-dir it runs in"
        )


class _Retained:
    """Read retained messages (and what follows them) from the site's broker."""

    def __init__(self, where: Where, *topics: str) -> None:
        self.docs: dict[str, Any] = {}
        self.changed = threading.Condition()
        self.bus = Bus(where.settings.mqtt, client_id=f"outpost-cli-{os.getpid()}-{time.monotonic_ns()}")
        for topic in topics:
            self.bus.subscribe(topic, self._on, qos=1)

    def _on(self, msg: Message) -> None:
        try:
            doc = orjson.loads(msg.payload) if msg.payload else None
        except orjson.JSONDecodeError:
            doc = None
        with self.changed:
            self.docs[msg.topic] = doc
            self.changed.notify_all()

    def __enter__(self) -> _Retained:
        self.bus.start(wait_s=10)  # returns once subscribed: the retained messages come next
        return self

    def __exit__(self, *_: object) -> None:
        self.bus.stop(drain_s=5)

    def wait(self, pred: Any, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while not pred(self.docs):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
            return True

    def get(self, topic: str, timeout_s: float = RETAINED_WAIT_S) -> Any:
        self.wait(lambda d: topic in d, timeout_s)
        return self.docs.get(topic)


def _specs(where: Where) -> dict[str, Any]:
    return where.settings.agents.agents()


# --- outpost agents ----------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _agents_table(agents: dict[str, Any], title: str) -> Table:
    t = Table(title=title)
    for col in (
        "agent",
        "state",
        "actions/min",
        "cost/h",
        "breakers",
        "drift",
        "decisions",
        "acted",
        "esc. open",
        "override",
        "success",
        "p99 ms",
    ):
        t.add_column(col, no_wrap=col != "agent")
    for name, a in sorted(agents.items()):
        state = str(a.get("state", "?")) + (" (dry-run)" if a.get("dry_run") else "")
        if a.get("halted"):
            state += f"\n{str(a['halted'])[:60]}"
        drift = a.get("drift") or {}
        t.add_row(
            name,
            state,
            f"{_fmt(a.get('actions_last_minute'))} / {_fmt(a.get('actions_per_minute'))}",
            f"{_fmt(a.get('cost_last_hour'))} / {_fmt(a.get('cost_per_hour'))}",
            ", ".join(f"{c} ({s:.0f}s)" for c, s in (a.get("breakers") or {}).items()) or "closed",
            ("DRIFTED " if drift.get("drifted") else "") + f"{drift.get('distance', 0):.2f}"
            if drift
            else "-",
            _fmt(a.get("decisions")),
            _fmt(a.get("acted")),
            _fmt(a.get("escalations_open")),
            _fmt(a.get("override_rate")),
            _fmt(a.get("success_rate")),
            _fmt(a.get("latency_p99_ms"), 1),
        )
    return t


@agents_app.command("list")
def list_agents(
    json_out: JsonOpt = False, broker: SiteBrokerOpt = None, data_dir: DataDirOpt = None, site: SiteOpt = None
) -> None:
    """Each agent's state, budgets used against their limits, breakers, drift, decisions,
    escalations open and override rate: what the running agent service reports
    (control/agents/reported), else what agent.db last recorded."""
    where = find_site(data_dir, site, broker)
    reported: Any = None
    if port_open(where.settings.mqtt.host, where.settings.mqtt.port, timeout=2):
        topic = where.settings.topics.control("agents", "reported")
        with _Retained(where, topic) as r:
            reported = r.get(topic)
    if isinstance(reported, dict) and isinstance(reported.get("agents"), dict):
        age_s = max(0.0, (time.time_ns() - int(reported.get("ts", 0))) / 1e9)
        agents, source = reported["agents"], f"reported by the agent service {age_s:.0f} s ago"
    else:
        from outpost.services.agent.report import offline

        db = _db(where)
        try:
            agents = offline(db, _specs(where))
        finally:
            db.close()
        source = "from agent.db (the agent service does not report now)"
    stdout_console().print(_agents_table(agents, f"agents of site {where.site} ({source})"))
    if json_out:
        print_json({"site": where.site, "source": source, "agents": agents})


def _switch(verb: str, name: str | None, every: bool, wait_s: float, where: Where) -> None:
    """Publish the retained control document for ``verb`` and say what the service made of it."""
    from outpost.services.agent.supervisor import command, desired_state

    if (name is None) == (not every):
        raise ConfigError(f"give an agent's name or --all (outpost agents {verb} NAME|--all)")
    _need_broker(where)
    t = where.settings.topics
    desired, reported_topic = t.control("agents", "desired"), t.control("agents", "reported")
    with _Retained(where, desired, reported_topic) as r:
        current = r.get(desired)
        reported = r.get(reported_topic, 0.0)
        known = set(_specs(where))
        if isinstance(reported, dict):
            known |= set(reported.get("agents") or {})
        if name is not None and name not in known:
            raise ConfigError(
                f"no agent {name!r} on site {where.site!r} (agents: {', '.join(sorted(known)) or 'none'})"
            )
        try:  # a retained document the agents refuse is not built upon
            base = AgentsControl.model_validate(current if isinstance(current, dict) else {}).model_dump()
        except ValidationError as exc:
            Console(stderr=True).print(
                f"the retained {desired} is not a valid agents control ({validation_summary(exc)}): "
                "replaced, starting from every agent running",
                markup=False,
                highlight=False,
            )
            base = {}
        doc = command(base, verb, name)
        doc["ts"] = time.time_ns()
        r.bus.publish(desired, orjson.dumps(doc), qos=1, retain=True)
        if not r.bus.drain(10):
            raise BrokerError(f"the broker at {where.broker} did not confirm the control message")
        names = sorted(known) if name is None else [name]

        def applied(docs: dict[str, Any]) -> bool:
            rep = docs.get(reported_topic)
            if not isinstance(rep, dict) or int(rep.get("ts", 0)) < doc["ts"]:
                return False
            states = rep.get("agents") or {}
            return all(states.get(n, {}).get("state") == desired_state(doc, n) for n in names)

        confirmed = r.wait(applied, wait_s)
        final = r.docs.get(reported_topic) if confirmed else None
    target = "every agent" if name is None else name
    if final is not None:
        states = {n: (final.get("agents") or {}).get(n, {}).get("state", "?") for n in names}
        shown = ", ".join(f"{n}: {s}" for n, s in states.items())
        stdout_console().print(f"{verb} {target}: {shown}")
    else:
        stdout_console().print(
            f"{verb} {target}: published (retained on {desired}); the agent service has not confirmed "
            f"it within {wait_s:g} s: it applies it when it runs (if it refused it, `outpost log tail "
            "--kind dlq` says why)"
        )


@agents_app.command("stop")
def stop(
    name: NameArg = None,
    every: AllOpt = False,
    wait_s: WaitOpt = 5.0,
    broker: SiteBrokerOpt = None,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """Stop an agent (or --all): it decides nothing until resumed; held across restarts."""
    _switch("stop", name, every, wait_s, find_site(data_dir, site, broker))


@agents_app.command("pause")
def pause(
    name: NameArg = None,
    every: AllOpt = False,
    wait_s: WaitOpt = 5.0,
    broker: SiteBrokerOpt = None,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """Pause an agent (or --all): it decides nothing until resumed; held across restarts."""
    _switch("pause", name, every, wait_s, find_site(data_dir, site, broker))


@agents_app.command("resume")
def resume(
    name: NameArg = None,
    every: AllOpt = False,
    wait_s: WaitOpt = 5.0,
    broker: SiteBrokerOpt = None,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """Resume a stopped, paused or halted agent (or --all; a breach's halt is cleared too)."""
    _switch("resume", name, every, wait_s, find_site(data_dir, site, broker))


# --- outpost escalations -----------------------------------------------------------------------------
def _ago(ns: int | None, now: int) -> str:
    if not ns:
        return "-"
    s = (ns - now) / 1e9
    return f"in {s:.0f} s" if s >= 0 else f"{-s:.0f} s ago"


@escalations_app.command("list")
def list_escalations(
    every: Annotated[
        bool, typer.Option("--all", help="Answered and timed-out ones too (newest first).")
    ] = False,
    json_out: JsonOpt = False,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """Open escalations (agent.db): the decision id to answer with, the agent, its question, the
    options and when it expires (then its declared safe default applies)."""
    from outpost.services.agent.report import escalations

    where = find_site(data_dir, site)
    db = _db(where)
    try:
        rows = escalations(db, everything=every)
    finally:
        db.close()
    now = time.time_ns()
    t = Table(title=f"escalations of site {where.site} ({len(rows)} {'shown' if every else 'open'})")
    for col in ("id", "agent", "question", "options", "expires" if not every else "state"):
        t.add_column(col, overflow="fold", no_wrap=col in ("id", "agent"))
    for e in rows:
        last = (
            _ago(e["expires_ns"], now)
            if not every
            else (e["state"] + (f": {e['choice']} by {e['by']}" if e["choice"] else ""))
        )
        t.add_row(e["decision"], e["agent"], e["question"], " / ".join(e["options"]), last)
    stdout_console().print(t)
    if json_out:
        print_json({"site": where.site, "escalations": rows})


def _answer(
    ident: str,
    choice: str,
    args: dict[str, Any] | None,
    by: str | None,
    note: str,
    wait_s: float,
    json_out: bool,
    where: Where,
) -> None:
    from outpost.services.agent.report import escalation

    db = _db(where)
    try:
        found = escalation(db, ident)
        if not found:
            raise ConfigError(f"no escalation {ident!r} on site {where.site!r} (`outpost escalations list`)")
        if len(found) > 1:
            raise ConfigError(f"{ident!r} names {len(found)} escalations: give more of the id")
        e = found[0]
        did, agent = e["decision"], e["agent"]
        if e["state"] != "open":
            raise ConfigError(
                f"escalation {did} is already {e['state']} ({e['choice']} by {e['by'] or 'timeout'})"
            )
        if choice not in e["options"]:
            raise ConfigError(
                f"{choice!r} is not an answer to escalation {did}: its options are {e['options']}"
            )
        _need_broker(where)
        reply: dict[str, Any] = {
            **header(e["trace"]),
            "choice": choice,
            "by": by or getpass.getuser(),
            "note": note,
            "args": args,
        }
        topic = where.settings.topics.escalation_reply(agent, did)
        bus = Bus(where.settings.mqtt, client_id=f"outpost-cli-{os.getpid()}-{time.monotonic_ns()}")
        bus.start(wait_s=10)
        try:
            bus.publish(topic, orjson.dumps(reply), qos=1)
            if not bus.drain(10):
                raise BrokerError(f"the broker at {where.broker} did not confirm the reply")
        finally:
            bus.stop(drain_s=0)
        deadline = time.monotonic() + wait_s
        row = None
        while True:
            row = db.execute(
                "SELECT state, choice, by, reply FROM escalations WHERE decision = ?", (did,)
            ).fetchone()
            if row is None or row[0] != "open" or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    finally:
        db.close()
    state = row[0] if row else "open"
    result = {
        "escalation": did,
        "agent": agent,
        "choice": choice,
        "by": reply["by"],
        "reply": reply["id"],
        "applied": bool(row) and row[3] == reply["id"],
        "state": state,
    }
    if result["applied"]:
        msg = f"{choice} by {reply['by']}: applied to escalation {did} of {agent}"
    elif state != "open":
        msg = (
            f"escalation {did} was {state} meanwhile ({row[1]} by {row[2] or 'timeout'}): "
            "this answer did not apply"
        )
    else:
        msg = (
            f"{choice} sent for escalation {did} of {agent}, not applied within {wait_s:g} s: is the agent "
            "service running? (`outpost status`)"
        )
    stdout_console().print(msg)
    if json_out:
        print_json(result)
    if not result["applied"]:
        raise typer.Exit(1)


IdArg = Annotated[str, typer.Argument(help="The escalation's id (its decision id, or a unique prefix).")]
ByOpt = Annotated[
    str | None, typer.Option("--by", help="Who answers (default: the OS user).", show_default=False)
]
NoteOpt = Annotated[str, typer.Option("--note", help="Why, for the record.")]


@escalations_app.command("approve")
def approve(
    ident: IdArg,
    by: ByOpt = None,
    note: NoteOpt = "",
    wait_s: WaitOpt = 5.0,
    json_out: JsonOpt = False,
    broker: SiteBrokerOpt = None,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """Approve what the agent asked for (or resume / acknowledge: the escalation's first option)."""
    where = find_site(data_dir, site, broker)
    _answer(ident, _first_option(ident, where, "approve"), None, by, note, wait_s, json_out, where)


@escalations_app.command("reject")
def reject(
    ident: IdArg,
    by: ByOpt = None,
    note: NoteOpt = "",
    wait_s: WaitOpt = 5.0,
    json_out: JsonOpt = False,
    broker: SiteBrokerOpt = None,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """Reject what the agent asked for (after a halt: keep it halted)."""
    where = find_site(data_dir, site, broker)
    _answer(ident, _first_option(ident, where, "reject"), None, by, note, wait_s, json_out, where)


@escalations_app.command("edit")
def edit(
    ident: IdArg,
    args: Annotated[str, typer.Option("--args", help="The capability's input as changed, a JSON object.")],
    by: ByOpt = None,
    note: NoteOpt = "",
    wait_s: WaitOpt = 5.0,
    json_out: JsonOpt = False,
    broker: SiteBrokerOpt = None,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """Approve with the capability's input changed (--args '{"quantity": 12}')."""
    try:
        parsed = orjson.loads(args)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"--args is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ConfigError(
            f"--args must be a JSON object (the capability's input), got {type(parsed).__name__}"
        )
    where = find_site(data_dir, site, broker)
    _answer(ident, "edit", parsed, by, note, wait_s, json_out, where)


def _first_option(ident: str, where: Where, verb: str) -> str:
    """approve / reject in the words of the escalation: after a halt they are resume /
    keep-halted, for a note they are acknowledge."""
    from outpost.services.agent.report import escalation

    db = _db(where)
    try:
        found = escalation(db, ident)
    finally:
        db.close()
    if len(found) != 1:
        return verb  # _answer says what is wrong
    options = found[0]["options"]
    if verb in options:
        return verb
    synonyms = {"approve": ("resume", "acknowledge"), "reject": ("keep-halted",)}[verb]
    return next((o for o in options if o in synonyms), verb)


# --- outpost replay ----------------------------------------------------------------------------------
def replay(
    agent: Annotated[str, typer.Option("--agent", help="The agent whose decisions are compared.")],
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            help="A YAML file with one agent declaration (default: the site's).",
            show_default=False,
        ),
    ] = None,
    since: Annotated[
        str | None, typer.Option("--from", help="From this origin time (ISO 8601 UTC, -1h, -30m, epoch ns).")
    ] = None,
    until: Annotated[str | None, typer.Option("--to", help="Before this origin time.")] = None,
    first: Annotated[int, typer.Option("--show", min=0, help="How many differences to list.")] = 20,
    json_out: JsonOpt = False,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """Shadow evaluation: run a policy (the agent's declaration, or --policy FILE) over the inputs
    the memory service logged and compare its decisions with those the agent took (agent.db).
    Budgets, breaker, kill switch and drift are not replayed."""
    from outpost.services.agent.replay import compare, load_spec, logged, shadow, taken
    from outpost.services.memory.oplog import OpLog

    where = find_site(data_dir, site)
    since_ns, until_ns = when_ns(since, "--from"), when_ns(until, "--to")
    if since_ns is not None and until_ns is not None and until_ns <= since_ns:
        raise ConfigError(f"--to {until} is not after --from {since}")
    if policy is not None:
        _, spec = load_spec(policy)
        source = str(policy)
    else:
        specs = _specs(where)
        if agent not in specs:
            raise ConfigError(
                f"no agent {agent!r} declared for site {where.site!r} "
                f"(agents: {', '.join(sorted(specs)) or 'none'}); give --policy FILE"
            )
        spec, source = specs[agent], "the site's declaration"
    log_path = where.site_path("memory", "oplog.db")
    if not log_path.is_file():
        raise where.missing("operational log", log_path)
    db = _db(where)
    oplog = OpLog(log_path, synchronous="NORMAL")
    try:
        with Phases(f"replay {agent}") as say:  # on stderr: --json's last line stays the report
            say(f"reading the operational log and running {source}")
            entries = _counted(logged(oplog, since_ns, until_ns), say)
            replayed = shadow(agent, spec, where.settings.topics.root, entries)
            say(f"comparing {replayed.inputs:,} inputs with the decisions {agent} took")
            report = compare(replayed, taken(db, agent, replayed.input_ids), first=first)
    finally:
        oplog.close()
        db.close()
    report = {"agent": agent, "policy": source, "from_ns": since_ns, "to_ns": until_ns, **report}
    _print_replay(report)
    if json_out:
        print_json(report)


def _counted(entries: Iterable[T], phases: Phases, every: int = 1_000) -> Iterator[T]:
    """``entries``, with the running count shown every ``every`` of them."""
    n = 0
    for n, entry in enumerate(entries, 1):
        if n % every == 0:
            phases.count(n, "log entries")
        yield entry
    phases.count(n, "log entries")


def _print_replay(r: dict[str, Any]) -> None:
    con = stdout_console()
    t = Table(title=f"replay of {r['agent']} with {r['policy']}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for key, label in (
        ("entries_read", "log entries read (events, scores, decisions)"),
        ("inputs", "inputs the agent senses"),
        ("decisions_taken", "decisions taken"),
        ("decisions_replayed", "decisions the policy would take"),
        ("same", "same"),
        ("differ", "differ (kind, capability or args)"),
        ("only_taken", "only taken"),
        ("only_new", "only the policy's"),
        ("batched_not_compared", "batched asks (not compared)"),
        ("policy_errors", "policy errors"),
    ):
        t.add_row(label, f"{r[key]:,}")
    con.print(t)
    if r["differences"]:
        d = Table(title=f"first {len(r['differences'])} differences")
        for col in ("what", "decision", "step", "taken", "would"):
            d.add_column(col, overflow="fold")

        def show(c: dict[str, Any] | None) -> str:
            if c is None:
                return "-"
            return f"{c['kind']} {c['capability'] or ''} {orjson.dumps(c['args']).decode()}".strip()

        for x in r["differences"]:
            d.add_row(x["what"], x["decision"], str(x["step"]), show(x["taken"]), show(x["would"]))
        con.print(d)
    con.print(f"not replayed: {r['not_replayed']}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(agents_app, name="agents")
    app.add_typer(escalations_app, name="escalations")
    app.command("replay")(replay)
