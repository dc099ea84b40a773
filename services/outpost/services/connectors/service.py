"""The connector gateway: action requests in (``.../actions/{connector}``), side effects on real
peers, results out (``.../actions/{connector}/results``). docs/connectors.md.

A request is checked (the connector, or else the one that offers its capability; the capability;
its args against the capability's JSON Schema; its deadline), written to the outbox
(:mod:`.outbox`) and only then acknowledged. The dispatcher (network thread, every tick) hands due
requests to the kit's worker threads, a connector at most ``concurrency`` calls at once, each call
taking a token from the connector's bucket and the capability's; requests with the same
``order_by`` value never overtake each other; a capability that batches sends up to ``batch.max``
requests in one call. A transient failure (a timeout, a 5xx, 429 with Retry-After, a refused
connection) puts the request back with jittered backoff and pauses its connector until then, so a
peer that is down is probed by one request, not hammered by all; past ``retry.attempts`` or
``retry.max_age_s`` it fails or expires, and is dead-lettered with the reason. Every outcome is
written before its result is published; a request sent again gets the stored result.

Once only: the key goes to the endpoint (an ``Idempotency-Key`` header, a unique constraint, a
message id) so a request tried again after a crash mid-call has its effect once where the endpoint
can deduplicate; a request whose outcome is on disk is never tried again.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
from pydantic import BaseModel

from outpost.backoff import backoff_delay
from outpost.bus import Alarm
from outpost.contracts import ACTION_REQUEST, ActionRequest, derived_id, header
from outpost.errors import ConfigError
from outpost.log import get_logger
from outpost.ratelimit import RateLimiter
from outpost.recent import RecentIds
from outpost.service import Ack, Inbound, ServiceRuntime, run_until, service_main
from outpost.services.connectors.kinds.base import Client, Context, Outcome, Request, SecretRef
from outpost.services.connectors.outbox import FORGET, open_outbox
from outpost.services.connectors.secrets import SecretStore, redact_tree
from outpost.services.connectors.spec import Capability, Connector
from outpost.services.registry import OutpostSettings
from outpost.store import Statement, log_failed_commit

log = get_logger("outpost.connectors")

NAME = "connectors"
REASONS = ("unknown_connector", "unknown_capability", "bad_args", "expired", "failed")
NEVER = 2**62
"""A quarantine threshold no bucket reaches: the core's rate limiter as a plain token bucket."""
RECENT_KEYS = 200_000
"""Outbox keys kept in memory (~25 MB at most)."""


@dataclass(slots=True)
class Queued:
    """A request waiting in the outbox (the in-memory mirror of its ``queued`` row)."""

    key: str
    id: str
    connector: str
    capability: str
    args: dict[str, Any]
    trace: str
    agent: str
    received_ns: int
    deadline_ns: int | None
    attempts: int = 0
    next_ns: int = 0
    order: str | None = None

    def request(self) -> Request:
        return Request(self.key, self.id, self.capability, self.args, self.trace, self.agent, self.attempts)


@dataclass(slots=True, eq=False)
class Lane:
    """One connector's queue, in arrival order, and what it has in flight."""

    conn: Connector
    client: Client
    queue: list[Queued] = field(default_factory=list)
    inflight: int = 0
    orders: set[str] = field(default_factory=set)
    """order_by values with a call in flight."""
    paused_until: int = 0
    """After a transient failure: the connector waits until the failed request's next try."""
    probing: bool = False
    """After a transient failure: one call at a time until one succeeds (a probe, not a volley)."""
    calls: int = 0


def secret_refs(model: Any) -> list[SecretRef]:
    """Every secret a declaration's endpoint names, wherever it is nested."""
    if isinstance(model, SecretRef):
        return [model]
    if isinstance(model, BaseModel):
        return [r for name in type(model).model_fields for r in secret_refs(getattr(model, name))]
    if isinstance(model, dict):
        return [r for v in model.values() for r in secret_refs(v)]
    if isinstance(model, list | tuple):
        return [r for v in model for r in secret_refs(v)]
    return []


class Gateway:
    def __init__(self, settings: OutpostSettings) -> None:
        cfg = self.cfg = settings.connectors
        self.connectors = cfg.connectors()  # a bad declaration: ConfigError naming the field
        self.rt = ServiceRuntime(
            NAME,
            settings,
            reasons=REASONS,
            durable=True,
            worker_threads=cfg.threads,
            worker_bound=max(64, cfg.threads * 4),
        )
        self.topics = self.rt.topics
        self.metrics = self.rt.metrics
        folder = self.rt.state_dir("connectors")  # where `outpost secrets` and `outpost actions` look
        self.secrets = SecretStore(folder)
        for c in self.connectors.values():
            for ref in secret_refs(c.endpoint):
                try:
                    self.secrets.get(ref.secret)
                except KeyError:
                    raise ConfigError(
                        f"connectors.declared.{c.name}.endpoint: no secret {ref.secret!r} "
                        f"(outpost secrets set {ref.secret})"
                    ) from None
        ctx = Context(self._resolve, settings)
        self.lanes = {
            name: Lane(c, c.kind.open(c.endpoint, c.spec.timeout_s, ctx))
            for name, c in self.connectors.items()
        }
        self.offered = {cap: c.name for c in self.connectors.values() for cap in c.capabilities}
        self.buckets: dict[str, RateLimiter] = {}
        for c in self.connectors.values():
            r = c.spec.rate
            self.buckets[c.name] = RateLimiter(r.per_s, r.burst, NEVER, 0.0)
            for cap in c.capabilities.values():
                if cap.spec.rate is not None:
                    self.buckets[f"{c.name}/{cap.name}"] = RateLimiter(
                        cap.spec.rate.per_s, cap.spec.rate.burst, NEVER, 0.0
                    )
        self.outbox = open_outbox(folder / "outbox.db", synchronous=cfg.log_sync)
        self._writes: list[Statement] = []
        self._publishes: list[tuple[str, bytes]] = []
        self._accepted: list[Queued] = []
        self._keys: set[str] = set()
        """Keys accepted since the last commit (a copy in the same commit is a duplicate)."""
        self._retry_at = 0.0
        self._known = RecentIds(
            RECENT_KEYS,
            (
                key
                for (key,) in reversed(
                    self.outbox.query(
                        "SELECT key FROM requests ORDER BY received_ns DESC LIMIT ?", (RECENT_KEYS,)
                    )
                )
            ),
        )
        """The outbox's recent keys: a new key (nearly every request) is known new without a query;
        a key seen before is looked up for its stored result."""
        self._flush_posted = False
        self._wake: Alarm = self.rt.alarm(self._tick, clock=time.time_ns)
        """The one wake-up for :meth:`_tick`: the earliest a lane needs (on the wall clock, as the
        outbox's times are)."""
        self._draining = False
        self._restore()
        if self.connectors:
            self.rt.subscribe(
                self.topics.all_actions,
                self._on_requests,
                contract=ACTION_REQUEST,
                ack=Ack.AFTER_COMMIT,
                topic_key=self.topics.action_connector,
            )
        else:
            # A site that declares no connector has no gateway to speak of: its agents' requests
            # stay in their outbox (re-sent until a gateway takes them), rather than each being
            # refused as unknown_connector, which would count as failures and open their breakers.
            log.info("no connectors declared: action requests wait in the agents' outbox")
        self.rt.after_reading(self._after_reading)
        self._wake.soon()  # what the outbox held at the last stop goes out now
        self.rt.every(60.0, self._forget)
        self.rt.extra_status = self._state

    def _resolve(self, ref: SecretRef) -> str:
        return self.secrets.get(ref.secret)

    def _restore(self) -> None:
        """Requests queued before a stop or a crash (one caught mid-call too) go back in their lanes."""
        for row in self.outbox.query(
            "SELECT key, id, connector, capability, args, trace, agent, received_ns, deadline_ns, attempts, "
            "next_ns FROM requests WHERE state = 'queued' ORDER BY received_ns"
        ):
            key, rid, conn, cap, args, trace, agent, received, deadline, attempts, next_ns = row
            lane = self.lanes.get(conn)
            if lane is None or cap not in lane.conn.capabilities:
                continue  # its connector was removed from the site file: it stays queued on disk
            q = Queued(
                key, rid, conn, cap, orjson.loads(args), trace, agent, received, deadline, attempts, next_ns
            )
            q.order = self._order(lane.conn.capabilities[cap], q.args)
            lane.queue.append(q)
        restored = sum(len(lane.queue) for lane in self.lanes.values())
        if restored:
            log.info("outbox resumed", extra={"queued": restored})
        self.metrics.counters["resumed"] += restored

    @staticmethod
    def _order(cap: Capability, args: dict[str, Any]) -> str | None:
        field_ = cap.spec.order_by
        return None if field_ is None else f"{field_}={args.get(field_)!r}"

    # --- intake (network thread) -----------------------------------------------------------------
    def _on_requests(self, inbound: Inbound[ActionRequest]) -> None:
        now = time.time_ns()
        for _, req in inbound.items:
            self.metrics.counters["requests"] += 1
            lane = self.lanes.get(inbound.key)
            if lane is None or req.capability not in lane.conn.capabilities:
                routed = self.offered.get(req.capability)
                if routed is not None:  # "by capability": the connector that offers it
                    lane = self.lanes[routed]
            if req.key in self._keys:
                self.metrics.counters["duplicates"] += 1
                continue
            row = (
                self.outbox.one("SELECT state, payload, connector FROM requests WHERE key = ?", (req.key,))
                if req.key in self._known
                else None
            )
            if row is not None:
                state, payload, conn = row
                self.metrics.counters["duplicates"] += 1
                if state != "queued" and payload is not None:  # settled: its result again
                    self._publishes.append((self.topics.action_results(conn), payload))
                continue
            self._keys.add(req.key)
            conn_name = lane.conn.name if lane is not None else inbound.key
            if lane is None:
                self._refuse(
                    req,
                    conn_name,
                    "unknown_connector",
                    f"no connector {inbound.key!r} offers {req.capability}",
                    inbound,
                    now,
                )
                continue
            cap = lane.conn.capabilities.get(req.capability)
            if cap is None:
                offered = ", ".join(sorted(lane.conn.capabilities))
                self._refuse(
                    req,
                    conn_name,
                    "unknown_capability",
                    f"{conn_name} offers {offered}, not {req.capability}",
                    inbound,
                    now,
                )
                continue
            errors = sorted(cap.validator.iter_errors(req.args), key=lambda e: list(e.absolute_path))
            if errors:
                e = errors[0]
                at = "/".join(str(p) for p in e.absolute_path) or "args"
                self._refuse(req, conn_name, "bad_args", f"{at}: {e.message}"[:500], inbound, now)
                continue
            if req.deadline_ns is not None and now > req.deadline_ns:
                self._refuse(req, conn_name, "expired", "its deadline passed before it arrived", inbound, now)
                continue
            args = orjson.dumps(req.args).decode()
            self._writes.append(
                (
                    "INSERT OR IGNORE INTO requests (key, id, connector, capability, args, trace, agent, "
                    "received_ns, deadline_ns, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
                    (
                        req.key,
                        req.id,
                        conn_name,
                        req.capability,
                        args,
                        req.trace,
                        req.agent,
                        now,
                        req.deadline_ns,
                    ),
                )
            )
            q = Queued(
                req.key,
                req.id,
                conn_name,
                req.capability,
                req.args,
                req.trace,
                req.agent,
                now,
                req.deadline_ns,
            )
            q.order = self._order(cap, req.args)
            self._accepted.append(q)
        if self._writes or self._publishes:
            self._soon()

    def _refuse(
        self, req: ActionRequest, conn: str, reason: str, detail: str, inbound: Inbound[Any], now: int
    ) -> None:
        """Bad input: a ``refused`` (or ``expired``) result on record and published, and a dead letter."""
        outcome = "expired" if reason == "expired" else "refused"
        payload = self._result(req.key, req.id, req.trace, outcome, detail, None, 0, 0.0, now)
        self._writes.append(
            (
                "INSERT OR IGNORE INTO requests (key, id, connector, capability, args, trace, agent, "
                "received_ns, deadline_ns, state, detail, settled_ns, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    req.key,
                    req.id,
                    conn,
                    req.capability,
                    orjson.dumps(req.args).decode(),
                    req.trace,
                    req.agent,
                    now,
                    req.deadline_ns,
                    outcome,
                    detail,
                    now,
                    payload,
                ),
            )
        )
        self._publishes.append((self.topics.action_results(conn), payload))
        self.metrics.counters[f"results.{conn}.{outcome}"] += 1
        self.rt.dead_letter(
            reason, detail, inbound.topic, req.model_dump_json().encode(), trace=req.trace, for_=inbound.turn
        )

    def _result(
        self,
        key: str,
        rid: str,
        trace: str,
        outcome: str,
        detail: str,
        result: Any,
        attempts: int,
        cost: float,
        now: int,
    ) -> bytes:
        return orjson.dumps(
            {
                **header(trace, id=derived_id(key, "result"), ts=now),
                "key": key,
                "request": rid,
                "outcome": outcome,
                "detail": self.secrets.redact(detail)[:2000],
                "result": result,
                "attempts": attempts,
                "cost": cost,
            }
        )

    # --- commit and dispatch (network thread) ----------------------------------------------------
    def _after_reading(self) -> None:
        """Requests that wrote nothing (a copy of one in the same commit) are acknowledged at once."""
        if not (self._writes or self._publishes):
            self.rt.committed()

    def _tick(self) -> None:
        """Commit what waits (then queue what it accepted), and dispatch. Runs when something
        happened (a read, a call's end) or when :meth:`_dispatch` asked to be woken, never on a
        fixed tick: an idle gateway sleeps."""
        if (self._writes or self._publishes) and time.monotonic() >= self._retry_at:
            self._commit()
        elif not self._writes:
            self.rt.committed()
        before = len(self._writes)
        self._dispatch()
        if len(self._writes) > before and time.monotonic() >= self._retry_at:
            self._soon()  # dispatch settled some (expired): on disk without waiting

    def _soon(self) -> None:
        """Commit and dispatch once the network thread has done what it is doing (a read's
        messages, the calls that finished meanwhile) rather than at the next tick: a request
        waits for no timer, and what arrived together still shares one commit (one fsync)."""
        if not self._flush_posted:
            self._flush_posted = True
            self.rt.bus.post(self._flush)

    def _flush(self) -> None:
        self._flush_posted = False
        self._tick()

    def _commit(self) -> None:
        try:
            self.outbox.commit(self._writes)
        except Exception as exc:  # noqa: BLE001 - log_failed_commit logs it, with its traceback
            self.metrics.counters["commit_failures"] += 1
            self._retry_at = time.monotonic() + 1.0
            log_failed_commit(log, "outbox", exc)
            self._wake.at(time.time_ns() + 1_000_000_000)  # again in a second (a full disk may clear)
            return
        publishes, self._writes, self._publishes = self._publishes, [], []
        accepted, self._accepted = self._accepted, []
        self._known.add_all(self._keys)
        self._keys.clear()
        for topic, payload in publishes:
            self.rt.publish(topic, payload, qos=1)
        self.rt.committed()
        for q in accepted:
            self.lanes[q.connector].queue.append(q)

    def _token_wait_s(self, conn: Connector, cap: Capability, mono: float) -> float:
        """How long until both buckets a call of ``cap`` takes from have a token (at least 1 ms)."""
        wait = self.buckets[conn.name].wait_s(conn.name, 1, mono)
        capb = self.buckets.get(f"{conn.name}/{cap.name}")
        if capb is not None:
            wait = max(wait, capb.wait_s(cap.name, 1, mono))
        return min(max(wait, 0.001), 60.0)

    def _take(self, conn: Connector, cap: Capability, mono: float) -> bool:
        capb = self.buckets.get(f"{conn.name}/{cap.name}")
        if capb is not None and not capb.take(cap.name, 1, mono):
            return False
        if self.buckets[conn.name].take(conn.name, 1, mono) == 1:
            return True
        if capb is not None:  # the connector said no: the capability's token was not used
            capb.give_back(cap.name, 1)
        return False

    def _dispatch(self) -> None:
        """Start the calls each lane may make now; for what must wait (a paused lane, a retry's
        backoff, a partial batch, a rate limit's next token) ask to be woken when it is due."""
        now = time.time_ns()
        mono = time.monotonic()
        for lane in self.lanes.values():
            if not lane.queue:
                continue
            if now < lane.paused_until:
                self._wake.at(lane.paused_until)
                continue
            conn = lane.conn
            limit = 1 if lane.probing else conn.spec.concurrency
            blocked: set[str] = set(lane.orders)
            waiting_caps: set[str] = set()
            i = 0
            while lane.inflight < limit and i < len(lane.queue):
                q = lane.queue[i]
                if q.capability in waiting_caps or (q.order is not None and q.order in blocked):
                    i += 1
                    continue
                if q.next_ns > now:
                    self._wake.at(q.next_ns)
                    if q.order is not None:
                        blocked.add(q.order)  # a later request with its order value waits behind it
                    i += 1
                    continue
                age_limit = q.received_ns + int(conn.spec.retry.max_age_s * 1e9)
                if now > age_limit or (q.deadline_ns is not None and now > q.deadline_ns):
                    lane.queue.pop(i)
                    self._settle(
                        lane,
                        q,
                        "expired",
                        f"not done within its age or deadline ({q.attempts} attempts)",
                        None,
                        q.attempts,
                        0.0,
                        now,
                        reason="expired",
                    )
                    continue
                cap = conn.capabilities[q.capability]
                batch_max = cap.spec.batch.max
                picked = [i]
                if batch_max > 1:
                    for j in range(i + 1, len(lane.queue)):
                        if len(picked) >= batch_max:
                            break
                        other = lane.queue[j]
                        if (
                            other.capability == q.capability
                            and other.next_ns <= now
                            and (other.order is None or other.order not in blocked)
                        ):
                            picked.append(j)
                    if len(picked) < batch_max and now - q.received_ns < cap.spec.batch.wait_s * 1e9:
                        waiting_caps.add(q.capability)  # a partial batch waits a little for more
                        self._wake.at(q.received_ns + int(cap.spec.batch.wait_s * 1e9))
                        i += 1
                        continue
                if not self._take(conn, cap, mono):
                    self.metrics.counters[f"rate_limited.{conn.name}"] += 1
                    self._wake.at(now + int(self._token_wait_s(conn, cap, mono) * 1e9))
                    break  # no token: this connector waits for the next one
                batch = [lane.queue[j] for j in picked]
                for j in reversed(picked):
                    lane.queue.pop(j)
                lane.inflight += 1
                lane.calls += 1
                for b in batch:
                    if b.order is not None:
                        lane.orders.add(b.order)
                        blocked.add(b.order)
                requests = [b.request() for b in batch]
                self.rt.submit(
                    partial(self._call, lane, cap, requests),
                    partial(self._called, lane, cap, batch, time.perf_counter_ns()),
                )

    # --- calls (worker threads, then the network thread) -----------------------------------------
    @staticmethod
    def _call(lane: Lane, cap: Capability, requests: Sequence[Request]) -> list[Outcome]:
        return lane.client.call(cap.op, requests)

    def _called(
        self,
        lane: Lane,
        cap: Capability,
        batch: list[Queued],
        started: int,
        out: list[Outcome] | BaseException,
    ) -> None:
        conn = lane.conn
        lane.inflight -= 1
        for q in batch:
            if q.order is not None:
                lane.orders.discard(q.order)
        self.metrics.histogram(f"call.{conn.name}").record_ns(time.perf_counter_ns() - started)
        self.metrics.counters[f"calls.{conn.name}"] += 1
        if isinstance(out, BaseException) or len(out) != len(batch):
            detail = (
                f"internal: {type(out).__name__}"
                if isinstance(out, BaseException)
                else "internal: outcome count"
            )
            log.error(
                "connector call failed",
                extra={"connector": conn.name, "error": self.secrets.redact(str(out))[:300]},
            )
            out = [Outcome(False, detail, retry=True) for _ in batch]
        now = time.time_ns()
        share = cap.cost / len(batch)
        retry = conn.spec.retry
        for q, o in zip(batch, out, strict=True):
            attempts = q.attempts + 1
            detail = self.secrets.redact(o.detail)
            o.result = redact_tree(o.result, self.secrets.redact)  # a peer may echo what it was sent
            if o.ok:
                self._settle(
                    lane, q, "duplicate" if o.duplicate else "done", detail, o.result, attempts, share, now
                )
                continue
            age_ok = now + 1 < q.received_ns + int(retry.max_age_s * 1e9)
            if o.retry and attempts < retry.attempts and age_ok:
                delay = max(o.retry_after_s or 0.0, backoff_delay(attempts - 1, *retry.backoff_s))
                # never past its age or deadline (a Retry-After of an hour): it expires then instead
                last = q.received_ns + int(retry.max_age_s * 1e9)
                if q.deadline_ns is not None:
                    last = min(last, q.deadline_ns)
                q.attempts, q.next_ns = attempts, min(now + int(delay * 1e9), last + 1)
                lane.paused_until = max(lane.paused_until, q.next_ns)
                lane.probing = True
                self._writes.append(
                    (
                        "UPDATE requests SET attempts = ?, next_ns = ?, detail = ? "
                        "WHERE key = ? AND state = 'queued'",
                        (attempts, q.next_ns, detail[:2000], q.key),
                    )
                )
                bisect.insort(lane.queue, q, key=lambda x: x.received_ns)
                self.metrics.counters[f"retries.{conn.name}"] += 1
                continue
            if o.retry and not age_ok:  # its age ran out during the call: expired, as in _dispatch
                why = f"not done within its age ({attempts} attempts; last: {detail})"
                self._settle(lane, q, "expired", why, o.result, attempts, share, now, reason="expired")
                continue
            why = detail if not o.retry else f"{detail} (gave up after {attempts} attempts)"
            self._settle(lane, q, "failed", why, o.result, attempts, share, now, reason="failed")
        if any(o.ok for o in out):
            lane.paused_until = 0  # it answers again: the rest need not wait out the pause
            lane.probing = False
        if self._draining:
            self._commit()
        else:
            self._soon()

    def _settle(
        self,
        lane: Lane,
        q: Queued,
        outcome: str,
        detail: str,
        result: Any,
        attempts: int,
        cost: float,
        now: int,
        *,
        reason: str | None = None,
    ) -> None:
        """The outcome on record (then its result published, after the commit)."""
        payload = self._result(q.key, q.id, q.trace, outcome, detail, result, attempts, cost, now)
        self._writes.append(
            (
                "UPDATE requests SET state = ?, attempts = ?, detail = ?, result = ?, cost = ?, "
                "settled_ns = ?, "
                "payload = ? WHERE key = ?",
                (outcome, attempts, detail[:2000], orjson.dumps(result).decode(), cost, now, payload, q.key),
            )
        )
        self._publishes.append((self.topics.action_results(lane.conn.name), payload))
        c = self.metrics.counters
        c[f"results.{lane.conn.name}.{outcome}"] += 1
        if cost:
            c[f"cost_millis.{lane.conn.name}"] += round(cost * 1000)
        if reason is not None:
            self.rt.dead_letter(
                reason,
                detail[:500],
                self.topics.actions(lane.conn.name),
                orjson.dumps(
                    {"key": q.key, "id": q.id, "capability": q.capability, "args": q.args, "agent": q.agent}
                ),
                trace=q.trace,
            )

    # --- upkeep ----------------------------------------------------------------------------------
    def _forget(self) -> None:
        cutoff = time.time_ns() - int(self.cfg.retention_s * 1e9)
        self._writes.append((FORGET, (cutoff,)))
        self._soon()

    def _state(self) -> dict[str, Any]:
        return {
            "connectors": {
                name: {"queued": len(lane.queue), "inflight": lane.inflight, "calls": lane.calls}
                for name, lane in self.lanes.items()
            }
        }

    def _drain(self) -> None:
        self._draining = True
        if self._writes or self._publishes:
            self._commit()

    def start(self) -> None:
        self.rt.start()

    def stop(self) -> None:
        try:
            self.rt.stop(self._drain)
        finally:
            for lane in self.lanes.values():
                try:
                    lane.client.close()
                except Exception:  # noqa: BLE001 - a peer that is gone cannot be closed politely
                    log.warning("closing a connector client failed", extra={"connector": lane.conn.name})
            self.outbox.close()


def run(settings: OutpostSettings, stop: threading.Event) -> Gateway:
    return run_until(Gateway(settings), stop)


def main() -> None:
    service_main(Gateway, OutpostSettings)
