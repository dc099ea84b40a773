"""The agent service: sensed events, scores, decisions and action results in; decisions,
escalations and action requests out (docs/agents.md).

One network thread owns all state (the kit's pattern): for each sensed input every agent that senses
its topic runs its policy (:mod:`.policy`); what the policy asks for passes the supervision
(:mod:`.supervisor`: kill switch, budgets, breaker) and the human-in-the-loop checks (confidence,
protected capabilities, drift), and becomes a decision: ``act`` (an action request, unless dry-run),
``escalate`` (a question to a person), ``ignore``, or ``halt`` (a breach stopped the agent).

Durability: decisions, escalations and action requests are written to ``agent.db`` in one
transaction per commit (at most one per ``agents.commit_ms``, right after the read that brought
the inputs: nothing polls) and only then published; the inputs that caused
them are acknowledged after that (``Ack.AFTER_COMMIT``). A decision's id is derived from the agent,
its input's id and its step, so a redelivered input (a crash before the acknowledgement) finds its
decision already written and publishes the stored messages again instead of deciding twice; an
action request's idempotency key is derived from its decision, so the connector gateway carries it
out once however often it is sent. Action requests stay in the outbox until their result arrives
(re-sent every ``agents.resend_s``, also right after a restart), so with no gateway running they
wait, never lost.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from paho.mqtt.client import topic_matches_sub
from pydantic import ValidationError

from outpost.bus import Alarm
from outpost.contracts import (
    ACTION_RESULT,
    DECISION,
    ESCALATION_REPLY,
    EVENT,
    SCORE,
    ActionResult,
    AgentsControl,
    Decision,
    EscalationReply,
    EventDict,
    Score,
    derived_id,
    header,
    validation_summary,
)
from outpost.errors import ConfigError, TopicError
from outpost.log import get_logger
from outpost.recent import RecentIds
from outpost.service import Ack, Inbound, Rejected, ServiceRuntime, run_until, service_main
from outpost.services.agent.drift import DriftWatch
from outpost.services.agent.inputs import from_decision, from_event, from_result, from_score
from outpost.services.agent.policy import Observation, Policy, Proposal, make_policy
from outpost.services.agent.report import DB_NAME, FOLDER, figures, open_escalations, operating, supervision
from outpost.services.agent.spec import AgentSpec
from outpost.services.agent.store import FORGET, open_agent_db
from outpost.services.agent.supervisor import Governor, desired_state
from outpost.services.registry import OutpostSettings
from outpost.store import Statement, log_failed_commit

log = get_logger("outpost.agents")

NAME = "agents"
REASONS = ("unknown_escalation", "already_answered", "bad_choice", "bad_control", "expired")
DECIDE_OPTIONS = ["approve", "reject", "edit"]
RESUME_OPTIONS = ["resume", "keep-halted"]
ACK_OPTIONS = ["acknowledge"]
_TOPIC_CACHE = 10_000
RECENT_DECISIONS = 200_000
"""Decision ids kept in memory for redelivered inputs (~20 MB at most)."""


@dataclass(slots=True, eq=False)
class Agent:
    name: str
    spec: AgentSpec
    policy: Policy
    governor: Governor
    drift: DriftWatch
    filters: list[str]
    dirty: bool = False
    stats: dict[str, float] = field(default_factory=dict)
    """Operating figures kept across restarts (rebuilt from agent.db at start)."""


@dataclass(slots=True)
class _Batch:
    """Asks collected for one batched action."""

    items: list[tuple[str, str, int, dict[str, Any], float, int]] = field(default_factory=list)
    """(input id, trace, collected at (wall ns), args, confidence, its reading's arrival at ingest
    (wall ns; 0: not known, e.g. restored after a restart: the table does not keep it))."""
    proposal: Proposal | None = None


def offered_capabilities(settings: OutpostSettings, specs: Mapping[str, AgentSpec]) -> dict[str, str]:
    """Capability -> the connector that offers it, from the site's connector declarations. Where the
    site declares connectors, an agent that may ask for a capability none offers is refused here, at
    start, not at its first action; where it declares none, action requests go by the capability's
    first part (``agents.routes``) and wait in the outbox for a gateway."""
    offered = {cap: c.name for c in settings.connectors.connectors().values() for cap in c.capabilities}
    if offered:
        for name, spec in specs.items():
            missing = sorted(set(spec.may) - set(offered))
            if missing:
                raise ConfigError(
                    f"agents.declared.{name}.may: no connector offers {', '.join(missing)} "
                    f"(offered: {', '.join(sorted(offered))})"
                )
    return offered


def _declared_batch(spec: AgentSpec, rule: str, cap: str) -> Proposal | None:
    """A restored batch's rule as declared (its ``batch_wait_s``; else a restart made a partial
    batch wait the default 30 s, whatever its rule said)."""
    for i, r in enumerate(spec.rules):
        if (r.name or f"rule {i}") == rule:
            return Proposal(cap, {}, 1.0, "", rule, r.batch, r.batch_wait_s)
    return None


class AgentService:
    def __init__(self, settings: OutpostSettings) -> None:
        cfg = self.cfg = settings.agents
        specs = cfg.agents()  # a bad declaration or pack: ConfigError naming the field
        self.offered = offered_capabilities(settings, specs)
        self.rt = ServiceRuntime(NAME, settings, reasons=REASONS, durable=True)
        t = self.topics = self.rt.topics
        self.metrics = self.rt.metrics
        self.store = open_agent_db(self.rt.state_dir(FOLDER) / DB_NAME, synchronous=cfg.log_sync)
        self.agents: dict[str, Agent] = {}
        for name, spec in specs.items():
            self.agents[name] = Agent(
                name,
                spec,
                make_policy(name, spec),
                Governor(spec),
                DriftWatch(spec.drift),
                [f"{t.root}/{pattern}" for pattern in spec.sense],
            )
        self._features: dict[str, dict[str, float]] = {}
        self._features_dirty: set[str] = set()
        self._batches: dict[tuple[str, str, str], _Batch] = {}
        self._restore()
        # what the next commit writes and then publishes
        self._writes: list[Statement] = []
        self._publishes: list[tuple[str, bytes]] = []
        self._pending_ids: set[str] = set()
        self._decision_docs: dict[str, list[bytes]] = {}
        """Decisions of the open commit, by agent: published as one JSON list each."""
        self._decided = RecentIds(
            RECENT_DECISIONS,
            (
                did
                for (did,) in reversed(
                    self.store.query("SELECT id FROM decisions ORDER BY ts DESC LIMIT ?", (RECENT_DECISIONS,))
                )
            ),
        )
        """Ids of the decisions committed lately, oldest first: a redelivered input is found here
        (the broker redelivers only what was not acknowledged, a few thousand at most) without a
        query per input."""
        self._answered: dict[str, str] = {}
        """Escalations answered since the last commit: decision -> the reply's id."""
        self._retry_at = 0.0
        self._last_commit = 0.0
        self._commit_due: Alarm = self.rt.alarm(self._commit_now)
        self._recovered_ms: float | None = None
        self._resumed = False
        self._sensing_cache: dict[str, list[Agent]] = {}
        self._latency = {a: self.metrics.histogram(f"decision_latency.{a}") for a in self.agents}
        self._cost: dict[str, float] = {}
        """Per agent, the cost of its settled actions since the process started (``cost_millis``)."""
        self.reported_topic = t.control(NAME, "reported")

        kinds = {p.split("/", 1)[0] for a in specs.values() for p in a.sense}
        ack = Ack.AFTER_COMMIT
        if "events" in kinds:
            self.rt.subscribe(
                t.all_events, self._on_events, contract=EVENT, ack=ack, topic_key=t.event_device
            )
        if "inference" in kinds:
            self.rt.subscribe(t.all_inference, self._on_scores, contract=SCORE, ack=ack)
        if "decisions" in kinds:
            self.rt.subscribe(t.all_decisions, self._on_decisions, contract=DECISION, ack=ack)
        self.rt.subscribe(t.all_action_results, self._on_results, contract=ACTION_RESULT, ack=ack)
        self.rt.subscribe(t.all_escalation_replies, self._on_reply, contract=ESCALATION_REPLY, ack=ack)
        self.rt.subscribe(t.control(NAME, "desired"), self._on_control, ack=Ack.AT_ONCE)
        self.rt.after_reading(self._after_reading)
        self.rt.every(cfg.check_s, self._check)
        self.rt.every(cfg.report_s, self._report)
        self.rt.every(60.0, self._forget)
        self.rt.extra_status = lambda: {"agents": {a.name: a.governor.state for a in self.agents.values()}}

    # --- restart ---------------------------------------------------------------------------------
    def _restore(self) -> None:
        """Supervision, policy and drift state, features and batches, as last committed."""
        for name, gov, pol, drift in self.store.query("SELECT name, governor, policy, drift FROM agents"):
            a = self.agents.get(name)
            if a is None:
                continue
            a.governor.load(orjson.loads(gov))
            a.policy.restore(orjson.loads(pol))
            a.drift.load(orjson.loads(drift))
        for device, values in self.store.query('SELECT device, "values" FROM features'):
            self._features[device] = orjson.loads(values)
        for agent, rule, cap, inp, trace, ts, args, confidence in self.store.query(
            "SELECT agent, rule, capability, input, trace, ts, args, confidence FROM batched ORDER BY ts"
        ):
            if agent in self.agents:
                b = self._batches.setdefault((agent, rule, cap), _Batch())
                b.items.append((inp, trace, ts, orjson.loads(args), confidence, 0))
                b.proposal = b.proposal or _declared_batch(self.agents[agent].spec, rule, cap)
        for a in self.agents.values():
            a.stats = figures(self.store.db, a.name)

    # --- sensing (network thread) ----------------------------------------------------------------
    def _sensing(self, topic: str) -> list[Agent]:
        agents = self._sensing_cache.get(topic)
        if agents is None:
            if len(self._sensing_cache) >= _TOPIC_CACHE:
                self._sensing_cache.clear()
            agents = [a for a in self.agents.values() if any(topic_matches_sub(f, topic) for f in a.filters)]
            self._sensing_cache[topic] = agents
        return agents

    def features(self, device: str) -> Mapping[str, float]:
        return self._features.get(device, {})

    def _on_events(self, inbound: Inbound[EventDict]) -> None:
        agents = self._sensing(inbound.topic)
        feats = self._features
        for _, e in inbound.items:
            device = e["device"]
            f = feats.get(device)
            if f is None:
                f = feats[device] = {}
            f[e["metric"]] = e["value"]
            self._features_dirty.add(device)
            if agents:
                obs = from_event(e)
                for a in agents:
                    self._decide(a, obs)

    def _on_scores(self, inbound: Inbound[Score]) -> None:
        agents = self._sensing(inbound.topic)
        if not agents:
            return
        for _, s in inbound.items:
            obs = from_score(s)
            for a in agents:
                if a.drift.add(s.score):
                    self._drift_changed(a)
                self._decide(a, obs)

    def _on_decisions(self, inbound: Inbound[Decision]) -> None:
        agents = self._sensing(inbound.topic)
        for _, d in inbound.items:
            obs = from_decision(d)
            for a in agents:
                if a.name != d.agent:  # an agent never senses its own decisions (a loop)
                    self._decide(a, obs)

    def _on_results(self, inbound: Inbound[ActionResult]) -> None:
        for _, r in inbound.items:
            row = self.store.one(
                "SELECT a.agent, a.capability, a.device, a.state, a.cost, d.task, d.id FROM actions a "
                "JOIN decisions d ON d.id = a.decision WHERE a.key = ?",
                (r.key,),
            )
            if row is None:
                self.metrics.counters["results_unknown"] += 1  # another service's action
                continue
            agent, cap, device, state, declared, task, decision = row
            if state != "pending":
                self.metrics.counters["results_repeated"] += 1
                continue
            now = time.time_ns()
            state = r.outcome
            self._writes.append(
                (
                    "UPDATE actions SET state = ?, detail = ?, cost = CASE WHEN ? > 0 THEN ? ELSE cost END "
                    "WHERE key = ? AND state = 'pending'",
                    (state, r.detail[:2000], r.cost, r.cost, r.key),
                )
            )
            self._writes.append(
                (
                    "UPDATE decisions SET outcome = ?, feedback = ? WHERE id = ?",
                    (
                        state,
                        orjson.dumps(
                            {"result": r.id, "detail": r.detail[:500], "attempts": r.attempts}
                        ).decode(),
                        decision,
                    ),
                )
            )
            a = self.agents.get(agent)
            if a is None:
                continue
            ok = state in ("done", "duplicate")
            a.stats["done" if ok else "failed"] += 1
            cost = r.cost if r.cost > 0 else float(declared)  # what the row now says it cost
            a.stats["cost"] += cost
            self._count_cost(agent, cost)
            self.metrics.counters[f"results.{agent}.{state}"] += 1
            if a.governor.result(cap, ok, now):
                self.metrics.counters[f"breaker_opened.{agent}"] += 1
                log.warning("breaker open", extra={"agent": agent, "capability": cap})
            a.dirty = True
            if any(topic_matches_sub(f, inbound.topic) for f in a.filters):
                steps = self.store.one("SELECT COUNT(*) FROM decisions WHERE task = ?", (task,))
                self._decide(a, from_result(r, cap, agent, device), task, int(steps[0]) if steps else 0)

    def _count_cost(self, agent: str, cost: float) -> None:
        """``cost_millis.{agent}``: the cost of the agent's settled actions since the process
        started, in thousandths (a counter is an integer), rounded once from the exact sum so that
        many small costs do not drift. A cost too large to count is logged and left out."""
        total = self._cost.get(agent, 0.0) + cost
        millis = total * 1000.0
        if not math.isfinite(millis) or millis >= 2**63:
            self.metrics.counters[f"cost_uncounted.{agent}"] += 1
            log.warning("action cost too large to count", extra={"agent": agent, "cost": cost})
            return
        self._cost[agent] = total
        self.metrics.counters[f"cost_millis.{agent}"] = round(millis)

    # --- deciding (network thread) ---------------------------------------------------------------
    def _decide(self, a: Agent, obs: Observation, task: str | None = None, steps_before: int = 0) -> None:
        if self._decided_before(a, obs):
            return
        if not a.governor.acting:
            self.metrics.counters[f"skipped.{a.name}.{a.governor.state}"] += 1
            return
        try:
            proposals = a.policy.decide(obs, self)
        except Exception:  # a plugin's bug: counted and logged, never the service's end
            self.metrics.counters[f"policy_errors.{a.name}"] += 1
            log.exception("policy failed", extra={"agent": a.name, "input": obs.id})
            return
        a.dirty = True
        if not proposals:
            return
        task = task or derived_id(a.name, obs.id)
        for step, p in enumerate(proposals):
            if p.batch > 1:
                self._collect(a, obs, p)
            else:
                self._step(a, obs, p, task, steps_before + step, step)
            if not a.governor.acting:
                break  # a breach halted it in this step: nothing after it acts

    def _decided_before(self, a: Agent, obs: Observation) -> bool:
        """A redelivered input (a crash before its acknowledgement) that ``a`` already decided on:
        its stored messages go out again, and the policy is not asked twice: its committed state
        already holds this input, so a cooldown or a repeat count would make it decide otherwise,
        and the decision and escalation it made would never be published."""
        did = derived_id(a.name, obs.id, "0")
        if did in self._pending_ids:
            return True
        step = 0
        while did in self._decided:
            self._republish(did)
            step += 1
            did = derived_id(a.name, obs.id, str(step))
        return step > 0

    def _step(self, a: Agent, obs: Observation, p: Proposal, task: str, steps_before: int, step: int) -> None:
        did = derived_id(a.name, obs.id, str(step))
        if did in self._pending_ids:
            return
        if did in self._decided:
            self._republish(did)
            return
        now = time.time_ns()
        spec, gov = a.spec, a.governor
        cap = p.capability
        if steps_before >= spec.limits.steps_per_task:
            self._halt(
                a,
                obs,
                p,
                task,
                did,
                step,
                f"steps_per_task: task {task} took {steps_before} steps (limit {spec.limits.steps_per_task})",
                now,
            )
            return
        if cap == "ignore":
            self._decision(a, obs, p, task, did, step, "ignore", p.reason, now)
            return
        if cap == "escalate":
            self._decision(a, obs, p, task, did, step, "escalate", p.reason, now)
            self._escalation(
                a,
                did,
                "acknowledge",
                f"{a.name}: {p.reason}",
                ACK_OPTIONS,
                None,
                p.args,
                obs.trace,
                now,
                self._context(obs, p),
            )
            return
        asks = []
        if p.confidence < spec.escalation.below:
            asks.append(f"confidence {p.confidence:.2f} < {spec.escalation.below:g}")
        if cap in spec.escalation.protected:
            asks.append(f"{cap} is protected")
        if a.drift.drifted:
            asks.append(f"inputs drifted (KS distance {a.drift.distance:.2f})")
        verdict = gov.check(cap, steps_before, now)
        if verdict.breach and not asks:
            self._halt(a, obs, p, task, did, step, f"{verdict.breach}: {verdict.why}", now)
            return
        if not verdict.ok and not verdict.breach:
            asks.append(verdict.why)
        if asks:
            why = f"{p.reason}; asks a person: {', '.join(asks)}"
            self._decision(a, obs, p, task, did, step, "escalate", why, now)
            question = f"{a.name} wants {cap} {orjson.dumps(p.args).decode()[:500]} ({', '.join(asks)})"
            self._escalation(
                a, did, "decide", question, DECIDE_OPTIONS, cap, p.args, obs.trace, now, self._context(obs, p)
            )
            return
        self._act(a, obs.trace, obs.device, p, task, did, step, p.reason, now, obs_id=obs.id, input_ts=obs.ts)
        if obs.arrived_ns:
            self._latency[a.name].record_ns(max(0, now - obs.arrived_ns))

    def _act(
        self,
        a: Agent,
        trace: str,
        device: str,
        p: Proposal,
        task: str,
        did: str,
        step: int,
        why: str,
        now: int,
        *,
        obs_id: str,
        input_ts: int,
        counted: bool = True,
    ) -> None:
        """An ``act`` decision and, unless dry-run, its action request in the outbox."""
        dry = a.spec.dry_run
        self._decision_row(a, trace, obs_id, input_ts, p, task, did, step, "act", why, now, dry_run=dry)
        if dry:
            return
        key = derived_id(did, "action")
        req_id = derived_id(did, "request")
        connector = self.offered.get(p.capability) or self.cfg.connector(p.capability)
        payload = orjson.dumps(
            {
                **header(trace, id=req_id, ts=now),
                "key": key,
                "agent": a.name,
                "capability": p.capability,
                "args": p.args,
                "deadline_ns": now + int(self.cfg.action_max_age_s * 1e9),
            }
        )
        cost = a.spec.costs.get(p.capability, 0.0)
        self._writes.append(
            (
                "INSERT OR IGNORE INTO actions (key, id, decision, agent, connector, capability, device, "
                "trace, "
                "created_ns, sent_ns, attempts, state, detail, cost, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, 'pending', NULL, ?, ?)",
                (key, req_id, did, a.name, connector, p.capability, device, trace, now, now, cost, payload),
            )
        )
        self._publishes.append((self.topics.actions(connector), payload))
        if counted:
            a.governor.acted(p.capability, now)
        self.metrics.counters[f"actions.{a.name}"] += 1

    def _decision(
        self,
        a: Agent,
        obs: Observation,
        p: Proposal,
        task: str,
        did: str,
        step: int,
        kind: str,
        why: str,
        now: int,
    ) -> None:
        self._decision_row(a, obs.trace, obs.id, obs.ts, p, task, did, step, kind, why, now)
        if obs.arrived_ns:
            self._latency[a.name].record_ns(max(0, now - obs.arrived_ns))

    def _decision_row(
        self,
        a: Agent,
        trace: str,
        obs_id: str,
        input_ts: int,
        p: Proposal,
        task: str,
        did: str,
        step: int,
        kind: str,
        why: str,
        now: int,
        *,
        dry_run: bool = False,
    ) -> None:
        cap = p.capability if p.capability not in ("ignore", "escalate") else None
        payload = orjson.dumps(
            {
                **header(trace, id=did, ts=now),
                "agent": a.name,
                "task": task,
                "kind": kind,
                "capability": cap,
                "args": p.args,
                "confidence": p.confidence,
                "reason": why[:2000],
                "dry_run": dry_run,
            }
        )
        args = orjson.dumps(p.args).decode()
        self._writes.append(
            (
                "INSERT OR IGNORE INTO decisions (id, agent, task, step, kind, capability, args, confidence, "
                "reason, trace, input, input_ts, rule, dry_run, ts, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    did,
                    a.name,
                    task,
                    step,
                    kind,
                    cap,
                    args,
                    p.confidence,
                    why[:2000],
                    trace,
                    obs_id,
                    input_ts,
                    p.rule,
                    int(dry_run),
                    now,
                    payload,
                ),
            )
        )
        self._decision_docs.setdefault(a.name, []).append(payload)
        self._pending_ids.add(did)
        s = a.stats
        s["decisions"] += 1
        s[kind] = s.get(kind, 0) + 1
        if dry_run:
            s["dry_run"] += 1
        self.metrics.counters[f"decisions.{a.name}.{kind}"] += 1

    def _escalation(
        self,
        a: Agent,
        did: str,
        purpose: str,
        question: str,
        options: list[str],
        cap: str | None,
        args: dict[str, Any],
        trace: str,
        now: int,
        context: dict[str, Any],
    ) -> None:
        esc = a.spec.escalation
        expires = now + int(esc.timeout_s * 1e9)
        payload = orjson.dumps(
            {
                **header(trace, id=derived_id(did, "escalation"), ts=now),
                "agent": a.name,
                "decision": did,
                "question": question[:2000],
                "options": options,
                "expires_ns": expires,
                "context": context,
            }
        )
        self._writes.append(
            (
                "INSERT OR IGNORE INTO escalations (decision, agent, purpose, question, options, "
                "capability, args, trace, created_ns, expires_ns, state, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', ?)",
                (
                    did,
                    a.name,
                    purpose,
                    question[:2000],
                    orjson.dumps(options).decode(),
                    cap,
                    orjson.dumps(args).decode(),
                    trace,
                    now,
                    expires,
                    payload,
                ),
            )
        )
        self._publishes.append((self.topics.escalations(a.name), payload))
        self.metrics.counters[f"escalations.{a.name}"] += 1

    def _context(self, obs: Observation, p: Proposal) -> dict[str, Any]:
        """What a person sees with a question: the input, the device's last readings, the reason."""
        return {
            "input": {"kind": obs.kind, "id": obs.id, "device": obs.device, **obs.fields},
            "features": dict(self._features.get(obs.device, {})),
            "reason": p.reason,
        }

    def _halt(
        self, a: Agent, obs: Observation, p: Proposal, task: str, did: str, step: int, why: str, now: int
    ) -> None:
        """A breach: the step does not act, the agent stops acting, a person is asked to resume it."""
        a.governor.halt(why, now)
        a.dirty = True
        self.metrics.counters[f"breaches.{a.name}"] += 1
        log.warning("agent halted", extra={"agent": a.name, "why": why})
        self._decision(
            a, obs, p, task, did, step, "halt", f"halted: {why} (it asked for {p.capability})", now
        )
        self._escalation(
            a,
            did,
            "resume",
            f"{a.name} was halted: {why}. Resume it?",
            RESUME_OPTIONS,
            None,
            {},
            obs.trace,
            now,
            self._context(obs, p),
        )

    def _drift_changed(self, a: Agent) -> None:
        d = a.drift
        self.metrics.counters[f"drift_{'started' if d.drifted else 'ended'}.{a.name}"] += 1
        log.warning(
            "inputs drifted" if d.drifted else "inputs back to baseline",
            extra={"agent": a.name, "distance": round(d.distance, 3), "p": d.p},
        )

    def _collect(self, a: Agent, obs: Observation, p: Proposal) -> None:
        key = (a.name, p.rule, p.capability)
        b = self._batches.setdefault(key, _Batch())
        if any(item[0] == obs.id for item in b.items):
            return  # a redelivered input
        now = time.time_ns()
        b.items.append((obs.id, obs.trace, now, p.args, p.confidence, obs.arrived_ns))
        b.proposal = p
        self._writes.append(
            (
                "INSERT OR IGNORE INTO batched (agent, rule, capability, input, trace, ts, args, confidence) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    a.name,
                    p.rule,
                    p.capability,
                    obs.id,
                    obs.trace,
                    now,
                    orjson.dumps(p.args).decode(),
                    p.confidence,
                ),
            )
        )
        if len(b.items) >= p.batch:
            self._flush_batch(a, key, b)

    def _flush_batch(self, a: Agent, key: tuple[str, str, str], b: _Batch) -> None:
        """One decision for the batch's asks (its args: ``items``, ``count``)."""
        items, b.items = b.items, []
        if not items:
            return
        _, rule, cap = key
        trace = items[0][1]
        inputs = [i[0] for i in items]
        batch_id = derived_id(a.name, rule, cap, *inputs)
        proto = b.proposal
        p = Proposal(
            cap,
            {"items": [i[3] for i in items], "count": len(items)},
            min(i[4] for i in items),
            f"{rule}: {len(items)} asks batched"
            if proto is None
            else f"{proto.rule}: {len(items)} asks batched",
            rule,
        )
        now = time.time_ns()
        # its decision latency runs from the first of its readings to arrive (the longest wait)
        arrived = min((i[5] for i in items if i[5]), default=0)
        obs = Observation("event", batch_id, trace, now, "", {}, arrived)
        for inp in inputs:
            self._writes.append(
                (
                    "DELETE FROM batched WHERE agent = ? AND rule = ? AND capability = ? AND input = ?",
                    (a.name, rule, cap, inp),
                )
            )
        self._step(a, obs, p, derived_id(a.name, batch_id), 0, 0)

    def _republish(self, did: str) -> None:
        """A decision made before a crash, whose input came again: its messages, not a new one."""
        self.metrics.counters["decisions_again"] += 1
        for payload, topic_agent in self.store.query(
            "SELECT payload, agent FROM decisions WHERE id = ?", (did,)
        ):
            self._publishes.append((self.topics.decisions(topic_agent), payload))
        for payload, agent in self.store.query(
            "SELECT payload, agent FROM escalations WHERE decision = ? AND state = 'open'", (did,)
        ):
            self._publishes.append((self.topics.escalations(agent), payload))
        for payload, connector in self.store.query(
            "SELECT payload, connector FROM actions WHERE decision = ? AND state = 'pending'", (did,)
        ):
            self._publishes.append((self.topics.actions(connector), payload))

    # --- people (network thread) -----------------------------------------------------------------
    def _on_reply(self, inbound: Inbound[EscalationReply]) -> None:
        try:
            agent, decision = self.topics.escalation_reply_of(inbound.topic)
        except TopicError as exc:
            raise Rejected("bad_topic", str(exc)) from None
        for _, reply in inbound.items:
            row = self.store.one(
                "SELECT state, options, reply, choice, by FROM escalations WHERE decision = ? AND agent = ?",
                (decision, agent),
            )
            if row is None:
                raise Rejected("unknown_escalation", f"{agent} has no escalation {decision}")
            state, options, replied, choice, by = row
            if decision in self._answered:
                state, replied = "answered", self._answered[decision]
            if state != "open":
                if replied == reply.id:
                    self.metrics.counters["replies_again"] += 1
                    continue
                raise Rejected(
                    "already_answered",
                    f"escalation {decision} was {state} ({choice or 'pending'} by {by or 'timeout'})",
                )
            if reply.choice not in orjson.loads(options):
                raise Rejected("bad_choice", f"{reply.choice!r} is not one of {orjson.loads(options)}")
            if reply.choice == "edit" and reply.args is None:
                raise Rejected("bad_choice", "edit needs args: the capability's input as changed")
            self._answer(decision, reply.choice, reply.by, reply.note, reply.args, reply.id, human=True)

    def _answer(
        self,
        decision: str,
        choice: str,
        by: str,
        note: str,
        edited: dict[str, Any] | None,
        reply_id: str,
        *,
        human: bool,
    ) -> None:
        row = self.store.one(
            "SELECT e.agent, e.purpose, e.capability, e.args, e.trace, d.task, d.step, d.input, "
            "d.input_ts, d.confidence, "
            "d.rule FROM escalations e JOIN decisions d ON d.id = e.decision WHERE e.decision = ?",
            (decision,),
        )
        if row is None:
            return
        agent, purpose, cap, args, trace, task, step, inp, input_ts, confidence, rule = row
        now = time.time_ns()
        self._answered[decision] = reply_id
        self._writes.append(
            (
                "UPDATE escalations SET state = ?, choice = ?, by = ?, note = ?, reply = ?, answered_ns = ? "
                "WHERE decision = ? AND state = 'open'",
                ("answered" if human else "timed_out", choice, by, note[:2000], reply_id, now, decision),
            )
        )
        self._writes.append(
            (
                "UPDATE decisions SET outcome = ?, feedback = ? WHERE id = ?",
                (
                    f"{choice} ({'person' if human else 'timeout'})",
                    orjson.dumps({"choice": choice, "by": by, "note": note[:500], "args": edited}).decode(),
                    decision,
                ),
            )
        )
        a = self.agents.get(agent)
        if a is None:
            return
        s = a.stats
        if not human:
            s["timeouts"] += 1
            self.metrics.counters[f"escalation_timeouts.{agent}"] += 1
        elif purpose == "decide":
            s["answered"] += 1
            self.metrics.counters[f"answered.{agent}"] += 1
            if choice in ("reject", "edit"):
                s["overrides"] += 1
                self.metrics.counters[f"overrides.{agent}"] += 1
        if purpose == "resume":
            if choice == "resume":
                a.governor.resume()
                a.dirty = True
                log.info("agent resumed", extra={"agent": agent, "by": by})
            return
        if purpose != "decide" or cap is None:
            return
        follow = derived_id(decision, "answer")
        who = f"{by}" if human else "nobody in time: the safe default"
        p = Proposal(
            cap,
            edited if choice == "edit" and edited is not None else orjson.loads(args),
            confidence,
            "",
            rule,
        )
        # a person's approval is theirs to give; the timeout's default stays within the budgets and
        # acts for no halted agent (else a runaway's low-confidence asks would all act, unbudgeted)
        held = "" if human or a.governor.acting else f"the agent is {a.governor.state}"
        if not held and not human:
            held = a.governor.check(cap, 0, now).why
        if choice in ("approve", "edit") and a.governor.desired == "running" and not held:
            self._act(
                a, trace, "", p, task, follow, step, f"{choice} by {who}", now, obs_id=inp, input_ts=input_ts
            )
        else:
            why = (
                f"{choice} by {who}"
                if choice == "reject"
                else f"{choice} by {who}, but {held or f'the agent is {a.governor.desired}'}"
            )
            self._decision_row(a, trace, inp, input_ts, p, task, follow, step, "ignore", why, now)

    # --- the operator's switch (network thread) --------------------------------------------------
    def _on_control(self, inbound: Inbound[bytes]) -> None:
        """``control/agents/desired`` (retained): an :class:`~outpost.contracts.AgentsControl`."""
        try:
            ctl = AgentsControl.model_validate_json(inbound.raw or b"{}")
        except ValidationError as exc:
            raise Rejected("bad_control", validation_summary(exc)) from None
        doc, ts, resume = ctl.model_dump(), ctl.ts, ctl.resume
        for a in self.agents.values():
            before = a.governor.state
            a.governor.desired = desired_state(doc, a.name)
            if a.governor.halted and ("*" in resume or a.name in resume) and ts > a.governor.halted_ns:
                a.governor.resume()
            if a.governor.state != before:
                a.dirty = True
                log.info("agent state", extra={"agent": a.name, "state": a.governor.state, "was": before})
        self._report()

    # --- commit (network thread) -----------------------------------------------------------------
    def _after_reading(self) -> None:
        """Once what waited on the socket is handled: what it decided is committed (at once, or
        when ``commit_ms`` has passed since the last commit, so a flood commits in batches);
        inputs that decided nothing are acknowledged as they are."""
        if self._writes or self._publishes:
            self._commit_soon()
        elif not self._commit_due.pending:
            self.rt.committed()

    def _commit_soon(self) -> None:
        at = max(self._last_commit + self.cfg.commit_ms / 1000.0, self._retry_at)
        self._commit_due.soon(at - time.monotonic())

    def _commit_now(self) -> None:
        if self._writes or self._publishes:
            self.commit()
        else:
            self.rt.committed()

    def commit(self) -> None:
        """Write what waits in one transaction, then publish it, then let its inputs be acknowledged.
        A failed write (a full disk) keeps it all for the next try and acknowledges nothing."""
        writes = self._writes + self._agent_states()
        self._last_commit = time.monotonic()
        try:
            self.store.commit(writes)
        except Exception as exc:  # noqa: BLE001 - log_failed_commit logs it, with its traceback
            self.metrics.counters["commit_failures"] += 1
            self._retry_at = time.monotonic() + 1.0
            log_failed_commit(log, "agent.db", exc)
            self._commit_soon()  # again in a second (a full disk may clear)
            return
        publishes, self._writes, self._publishes = self._publishes, [], []
        docs, self._decision_docs = self._decision_docs, {}
        self._decided.add_all(self._pending_ids)
        self._pending_ids.clear()
        self._answered.clear()
        batch = self.rt.batch
        for agent, payloads in docs.items():  # a commit's decisions: one message per agent
            self.rt.publish(
                self.topics.decisions(agent), b"[" + b",".join(payloads) + b"]", qos=1, for_=batch
            )
        for topic, payload in publishes:
            self.rt.publish(topic, payload, qos=1, for_=batch)
        self.metrics.counters["commits"] += 1
        self.rt.committed()

    def _agent_states(self) -> list[Statement]:
        out: list[Statement] = []
        for a in self.agents.values():
            if a.dirty:
                a.dirty = False
                out.append(
                    (
                        "INSERT INTO agents (name, governor, policy, drift) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET governor = excluded.governor, "
                        "policy = excluded.policy, drift = excluded.drift",
                        (
                            a.name,
                            orjson.dumps(a.governor.dump()).decode(),
                            orjson.dumps(a.policy.state()).decode(),
                            orjson.dumps(a.drift.dump()).decode(),
                        ),
                    )
                )
        if self._features_dirty:
            for device in self._features_dirty:
                out.append(
                    (
                        'INSERT OR REPLACE INTO features (device, "values") VALUES (?, ?)',
                        (device, orjson.dumps(self._features[device]).decode()),
                    )
                )
            self._features_dirty.clear()
        return out

    # --- timers (network thread) -----------------------------------------------------------------
    def _check(self) -> None:
        """Escalations past their time, batches past their wait, the outbox's re-sends, and the
        agents' state (committed now and then even when nothing was decided)."""
        now = time.time_ns()
        if not self._resumed:
            self._resumed = True
            self._resend(now, everything=True)  # a restart resumes what was pending at once
            self._recovered_ms = (time.time_ns() - self.rt.started_ns) / 1e6
            self.metrics.histogram("recovery").record_ns(int(self._recovered_ms * 1e6))
            self._writes.append(
                (
                    "INSERT OR REPLACE INTO runs (started_ns, recovered_ms) VALUES (?, ?)",
                    (self.rt.started_ns, self._recovered_ms),
                )
            )
        for decision, agent, purpose in self.store.query(
            "SELECT decision, agent, purpose FROM escalations "
            "WHERE state = 'open' AND expires_ns <= ? LIMIT 500",
            (now,),
        ):
            if decision in self._answered or agent not in self.agents:
                continue
            default = {"decide": self.agents[agent].spec.escalation.on_timeout, "resume": "keep-halted"}
            self._answer(decision, default.get(purpose, "acknowledge"), "timeout", "", None, "", human=False)
        for key, b in list(self._batches.items()):
            a = self.agents.get(key[0])
            if a is None or not b.items:
                continue
            wait = b.proposal.batch_wait_s if b.proposal else 30.0
            if now - b.items[0][2] >= wait * 1e9 and a.governor.acting:
                self._flush_batch(a, key, b)
        self._resend(now)
        dirty = any(a.dirty for a in self.agents.values()) or self._features_dirty
        if dirty or self._writes or self._publishes:
            if time.monotonic() >= self._retry_at:
                self.commit()
            else:
                self._commit_soon()

    def _resend(self, now: int, *, everything: bool = False) -> None:
        """Action requests with no result yet go out again (same bytes, same key); past their age
        they expire, are dead-lettered with the reason and count as failures."""
        before = self.rt.started_ns if everything else now - int(self.cfg.resend_s * 1e9)
        max_age = int(self.cfg.action_max_age_s * 1e9)
        for key, payload, connector, agent, cap, created, decision, trace in self.store.query(
            "SELECT key, payload, connector, agent, capability, created_ns, decision, trace FROM actions "
            "WHERE state = 'pending' AND sent_ns <= ? ORDER BY sent_ns LIMIT 1000",
            (before,),
        ):
            if now - created >= max_age:
                self._writes.append(
                    ("UPDATE actions SET state = 'expired' WHERE key = ? AND state = 'pending'", (key,))
                )
                self._writes.append(("UPDATE decisions SET outcome = 'expired' WHERE id = ?", (decision,)))
                self.rt.dead_letter(
                    "expired",
                    f"no result for {cap} within {self.cfg.action_max_age_s:g}s",
                    self.topics.actions(connector),
                    payload,
                    trace=trace,
                )
                a = self.agents.get(agent)
                if a is not None:
                    a.stats["failed"] += 1
                continue
            self._writes.append(
                (
                    "UPDATE actions SET sent_ns = ?, attempts = attempts + 1 "
                    "WHERE key = ? AND state = 'pending'",
                    (now, key),
                )
            )
            self._publishes.append((self.topics.actions(connector), payload))
            self.metrics.counters["actions_resent"] += 1

    def _forget(self) -> None:
        """Retention (``agents.retention_s``): :data:`~outpost.services.agent.store.FORGET`."""
        cutoff = time.time_ns() - int(self.cfg.retention_s * 1e9)
        self._writes.extend((sql, (cutoff,)) for sql in FORGET)
        self._commit_soon()

    def _report(self) -> None:
        """Each agent's state, budgets used, breakers, drift and operating figures, retained on
        ``control/agents/reported`` (what ``outpost agents list`` shows)."""
        now = time.time_ns()
        opened = open_escalations(self.store.db)
        agents: dict[str, Any] = {}
        for a in self.agents.values():
            h = self._latency[a.name]
            agents[a.name] = {
                **supervision(a.spec, a.governor, a.drift, now),
                **operating(a.stats, int(opened.get(a.name, 0))),
                "latency_p50_ms": round(h.percentile_ms(50), 3) if h.count else None,
                "latency_p99_ms": round(h.percentile_ms(99), 3) if h.count else None,
            }
        mean = self.store.one("SELECT AVG(recovered_ms), COUNT(*) FROM runs")
        doc = {
            **header(),
            "agents": agents,
            "recovered_ms": self._recovered_ms,
            "recovery_mean_ms": round(mean[0], 3) if mean and mean[0] is not None else None,
            "starts": mean[1] if mean else 0,
        }
        self.rt.publish(self.reported_topic, orjson.dumps(doc), qos=1, retain=True)

    # --- lifecycle -------------------------------------------------------------------------------
    def _drain(self) -> None:
        for a in self.agents.values():
            a.dirty = True
        self.commit()

    def start(self) -> None:
        self.rt.start()

    def stop(self) -> None:
        try:
            self.rt.stop(self._drain)
        finally:
            self.store.close()


def run(settings: OutpostSettings, stop: threading.Event) -> AgentService:
    return run_until(AgentService(settings), stop)


def main() -> None:
    service_main(AgentService, OutpostSettings)
