"""Shadow evaluation (``outpost replay``): run a policy over the recorded inputs and compare what it
would decide with what was decided.

The inputs come from the memory service's operational log (events, scores and other agents'
decisions, in log order: the order the service saw them); the decisions taken from ``agent.db``.
Everything here is pure (no bus, no clock): the service's own code does the deciding
(:func:`~outpost.services.agent.policy.make_policy`, :mod:`.inputs`), and this module repeats what
the service does around it, in the same order:

* every logged event updates its device's features (``feature.{metric}``) before any agent
  decides on it, whichever agents sense it (the service subscribes to every event);
* an agent decides only on the inputs whose topic its ``sense`` filters match, never on its own
  decisions;
* a proposal becomes a decision of kind ``ignore`` or ``escalate`` (the policy asked for them),
  ``escalate`` (confidence under ``escalation.below``, or a protected capability: a person
  decides), else ``act``; its id is ``derived_id(agent, input id, str(step))`` as in the service,
  so a decision taken and a decision replayed for the same input and step are compared by id.

Not replayed: budgets, the breaker, the kill switch and drift (they depend on wall time, action
results and the whole site's history, not on the policy), so a ``halt``, or an escalation the
service made because of drift or an open breaker, shows as a difference; batched asks (one decision
for many inputs, decided by wall time) are counted, not compared; the policy and the features
start empty at ``--from``. The report says so.
"""

from __future__ import annotations

import heapq
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
import yaml
from paho.mqtt.client import topic_matches_sub
from pydantic import ValidationError

from outpost.contracts import derived_id
from outpost.errors import ConfigError
from outpost.services.agent.inputs import from_logged
from outpost.services.agent.policy import Observation, Policy, make_policy
from outpost.services.agent.spec import AgentSpec

LOGGED_KINDS = ("event", "score", "decision")
"""The log's kinds an agent can sense (its ``sense`` patterns' first levels: events, inference,
decisions); action results are not replayed (their capability comes from agent.db's outbox)."""

NOT_REPLAYED = (
    "budgets, breaker, kill switch and drift are not replayed (a halt, or an escalation made for "
    "drift or an open breaker, shows as a difference); batched asks are counted, not compared; "
    "the policy's memory and the features start empty at --from"
)


class LoggedEntry(Protocol):
    """What the replay reads of an operational log entry (:class:`~outpost.services.memory.oplog.Entry`)."""

    @property
    def offset(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def topic(self) -> str: ...
    @property
    def body(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Choice:
    """A decision's substance: what is compared."""

    kind: str
    capability: str | None
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Shadow:
    """A decision the replayed policy would take."""

    id: str
    input: str
    trace: str
    step: int
    choice: Choice
    confidence: float
    reason: str


@dataclass(slots=True)
class Replayed:
    """What replaying the inputs gave: the decisions the policy would take, by id."""

    entries: int = 0
    """Log entries read (every event, score and decision in the range)."""
    inputs: int = 0
    """Observations the agent sensed (and decided on)."""
    batched: int = 0
    """Asks the policy would batch (not compared)."""
    policy_errors: int = 0
    decisions: dict[str, Shadow] = field(default_factory=dict)
    input_ids: set[str] = field(default_factory=set)


class _Features:
    """The replay's feature context: the service's ``features(device)``."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, float]] = {}

    def features(self, device: str) -> Mapping[str, float]:
        return self.values.get(device, {})


def classify(spec: AgentSpec, capability: str, confidence: float) -> Choice:
    """The kind of decision a proposal becomes in the service, supervision left aside."""
    if capability in ("ignore", "escalate"):
        return Choice(capability, None, {})
    if confidence < spec.escalation.below or capability in spec.escalation.protected:
        return Choice("escalate", capability, {})
    return Choice("act", capability, {})


def shadow(
    name: str,
    spec: AgentSpec,
    root: str,
    entries: Iterable[LoggedEntry],
    policy: Policy | None = None,
) -> Replayed:
    """Run ``spec``'s policy (or ``policy``) as agent ``name`` over ``entries`` (log order);
    ``root`` is the site's topic root (``outpost/v1/{site}``)."""
    policy = policy if policy is not None else make_policy(name, spec)
    filters = [f"{root}/{pattern}" for pattern in spec.sense]
    ctx = _Features()
    out = Replayed()
    for entry in entries:
        if entry.kind not in LOGGED_KINDS:
            continue
        out.entries += 1
        sensed = any(topic_matches_sub(f, entry.topic) for f in filters)
        for obs in from_logged(entry.kind, entry.body):
            if obs.kind == "event":
                metric, value = obs.fields["metric"], obs.fields["value"]
                ctx.values.setdefault(obs.device, {})[metric] = value
            if not sensed or (obs.kind == "decision" and obs.fields.get("agent") == name):
                continue
            out.inputs += 1
            out.input_ids.add(obs.id)
            _decide(name, spec, policy, obs, ctx, out)
    return out


def _decide(
    name: str, spec: AgentSpec, policy: Policy, obs: Observation, ctx: _Features, out: Replayed
) -> None:
    try:
        proposals = policy.decide(obs, ctx)
    except Exception:  # noqa: BLE001 - as in the service: a plugin's bug decides nothing
        out.policy_errors += 1
        return
    for step, p in enumerate(proposals):
        if p.batch > 1:
            out.batched += 1
            continue
        c = classify(spec, p.capability, p.confidence)
        did = derived_id(name, obs.id, str(step))
        out.decisions[did] = Shadow(
            did, obs.id, obs.trace, step, Choice(c.kind, c.capability, p.args), p.confidence, p.reason
        )


def merged(*streams: Iterable[LoggedEntry]) -> Iterator[LoggedEntry]:
    """Entries of several kinds (each in offset order) in one offset order."""
    return heapq.merge(*streams, key=lambda e: e.offset)


@dataclass(frozen=True, slots=True)
class Taken:
    """A decision the service took (a row of agent.db's decisions table)."""

    id: str
    input: str
    trace: str
    step: int
    choice: Choice
    reason: str


def compare(replayed: Replayed, taken: Iterable[Taken], *, first: int = 20) -> dict[str, Any]:
    """The report: counts of same / differ / only-taken / only-new, and the first ``first``
    differences (in the order of the inputs taken, then the new ones)."""
    taken_by_id = {t.id: t for t in taken if t.input in replayed.input_ids}
    same = differ = only_taken = only_new = 0
    listed: list[dict[str, Any]] = []

    def note(what: str, did: str, t: Taken | None, s: Shadow | None) -> None:
        if len(listed) >= first:
            return
        ref = t or s
        assert ref is not None
        listed.append(
            {
                "what": what,
                "decision": did,
                "input": ref.input,
                "trace": ref.trace,
                "step": ref.step,
                "taken": None if t is None else {**asdict(t.choice), "reason": t.reason},
                "would": None if s is None else {**asdict(s.choice), "reason": s.reason},
            }
        )

    for did, t in taken_by_id.items():
        s = replayed.decisions.get(did)
        if s is None:
            only_taken += 1
            note("only_taken", did, t, None)
        elif s.choice == t.choice:
            same += 1
        else:
            differ += 1
            note("differ", did, t, s)
    for did, s in replayed.decisions.items():
        if did not in taken_by_id:
            only_new += 1
            note("only_new", did, None, s)
    return {
        "entries_read": replayed.entries,
        "inputs": replayed.inputs,
        "decisions_taken": len(taken_by_id),
        "decisions_replayed": len(replayed.decisions),
        "same": same,
        "differ": differ,
        "only_taken": only_taken,
        "only_new": only_new,
        "batched_not_compared": replayed.batched,
        "policy_errors": replayed.policy_errors,
        "differences": listed,
        "not_replayed": NOT_REPLAYED,
    }


class ReadsLog(Protocol):
    """The part of :class:`~outpost.services.memory.oplog.OpLog` the replay reads."""

    def replay(
        self,
        *,
        from_offset: int | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
        kind: str | None = None,
        limit: int = 100_000,
    ) -> Sequence[LoggedEntry]: ...


def logged(
    oplog: ReadsLog, since_ns: int | None, until_ns: int | None, page: int = 5_000
) -> Iterator[LoggedEntry]:
    """The log's events, scores and decisions with an origin time in [since, until), in offset
    order, read a page at a time (a long range never sits in memory whole)."""

    def one_kind(kind: str) -> Iterator[LoggedEntry]:
        after = 0
        while True:
            batch = oplog.replay(
                from_offset=after + 1, since_ns=since_ns, until_ns=until_ns, kind=kind, limit=page
            )
            yield from batch
            if len(batch) < page:
                return
            after = batch[-1].offset

    return merged(*(one_kind(k) for k in LOGGED_KINDS))


def taken(db: sqlite3.Connection, agent: str, input_ids: Iterable[str]) -> list[Taken]:
    """The decisions ``agent`` took on these inputs (agent.db), each the decision of an input's
    step (a follow-up, such as the action after a person's approval, has an id of its own and is
    left out: it was not the policy's)."""
    ids = sorted(input_ids)
    out: list[Taken] = []
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        rows = db.execute(
            "SELECT id, input, trace, step, kind, capability, args, reason FROM decisions "
            f"WHERE agent = ? AND input IN ({','.join('?' * len(chunk))}) ORDER BY ts",
            (agent, *chunk),
        ).fetchall()
        for did, inp, trace, step, kind, cap, args, reason in rows:
            if did != derived_id(agent, inp, str(step)):
                continue
            out.append(Taken(did, inp, trace, int(step), Choice(kind, cap, orjson.loads(args)), reason))
    return out


def load_spec(path: Path) -> tuple[str | None, AgentSpec]:
    """A policy file: one agent declaration (``sense:``, ``rules:`` ...), or a mapping of one agent
    name to it (as under ``agents.declared``). A bad one is a ConfigError naming the field."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"policy file {path}: {exc}") from None
    name: str | None = None
    if isinstance(doc, dict) and "sense" not in doc and len(doc) == 1:
        ((key, value),) = doc.items()
        if isinstance(value, dict):
            name, doc = str(key), value
    if not isinstance(doc, dict):
        raise ConfigError(
            f"policy file {path}: expected one agent declaration (a mapping with sense, rules ...)"
        )
    try:
        return name, AgentSpec.model_validate(doc)
    except ValidationError as exc:
        fields = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"policy file {path}: {fields}") from None
