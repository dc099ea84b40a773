"""The memory service: the site's operational log, and the home of short-term context, checkpoints,
long-term memory (with text embeddings), the MQTT 5 request API and sync to the cloud (docs/memory.md).

For the log, it takes what the other services publish (events, scores, dead letters, and the agents'
decisions, escalations, replies, action requests and results) at QoS 1 with a durable session,
appends one log entry per message item, and commits in batches
(``memory.commit_ms`` or ``memory.commit_max``, whichever comes first). The log's subscriptions are
acknowledged after the commit (:attr:`Ack.AFTER_COMMIT`): kill -9 at any point leaves what was not
committed unacknowledged on the broker, which redelivers it, so nothing published is missing from
the log, and a copy of what was logged already (the same message ``id``) is left out
(:meth:`OpLog.append`).

Requests never run on the network thread, which must keep reading, committing and acknowledging
the log: they wait in a bounded lane, fair between clients (:mod:`.lane`; past its bounds a request
is refused as ``overloaded``), run on the kit's worker (:meth:`ServiceRuntime.submit`; its
``memory.request_workers`` threads, one request of a client at a time),
and are acknowledged once their answer is confirmed, in an acknowledgement lane of their own so the
log's acknowledgements never wait for a slow request. An answer goes only to a response topic of
memory's own (``.../memory/resp/{client}``): a request naming any other topic is dead-lettered as
``bad_response_topic``, never answered there. A redelivered copy of a request with effects (the
same response topic and correlation data) is answered from the first answer, kept on disk
(:mod:`.answers`), not run again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

from outpost.bus import Alarm
from outpost.contracts import Contract
from outpost.errors import TopicError
from outpost.log import get_logger
from outpost.service import Ack, Inbound, Rejected, ServiceRuntime, run_until, service_main
from outpost.services.memory.answers import Answers
from outpost.services.memory.api import MAX_REQUEST_BYTES, MemoryApi
from outpost.services.memory.checkpoints import Checkpoints
from outpost.services.memory.context import ShortTermContext
from outpost.services.memory.embedding.embedder import embedder_for
from outpost.services.memory.lane import FairLane
from outpost.services.memory.oplog import OpLog, Record
from outpost.services.memory.sync import start_sync, sync_on
from outpost.services.memory.vectors import LongTermMemory
from outpost.services.registry import OutpostSettings
from outpost.store import DiskFull, log_failed_commit
from outpost.streams import REASONS as STREAM_REASONS

NAME = "memory"
log = get_logger("outpost.memory")

REASONS = (
    "unknown_op",
    "bad_request",
    "conflict",
    "no_embedder",
    "over_limit",
    "overloaded",
    "bad_response_topic",
    "disk_full",
    *STREAM_REASONS,
)
"""The request API's refusals (services/outpost/services/memory/api.py, the lane's and the response
topic's) and sync's."""

DEAD_LETTERED = frozenset(("over_limit", "overloaded"))
"""Refusals dead-lettered although the requester is answered: an operator should see them."""

RETRY_CHUNK = 100
"""Entries a commit writes at a time after one failed for space: a retry needs room for what it
writes twice (the WAL, then the database), so a small step fits in the space just freed."""
BACKOFF_S = (0.25, 5.0)
"""First and longest wait between tries of a commit that failed."""

Answer = dict[str, Any]


@dataclass(slots=True, eq=False)
class _Request:
    inbound: Inbound[bytes]
    op: str
    client: str
    key: tuple[str, bytes] | None
    """(response topic, correlation data) of a request with effects; None: run every copy."""
    copies: list[Inbound[bytes]] = field(default_factory=list)
    """Redelivered copies that came while it waited or ran: answered with it."""


class _Logged(BaseModel):
    """Any JSON object: the log keeps what was published; checking it is its producer's job."""

    model_config = ConfigDict(extra="allow")


LOGGED: Contract[dict[str, Any]] = Contract("logged", _Logged, dict[str, Any], batches=True)


class MemoryService:
    def __init__(self, settings: OutpostSettings) -> None:
        self.settings = settings
        cfg = self.cfg = settings.memory
        rt = self.rt = ServiceRuntime(
            NAME,
            settings,
            reasons=REASONS,
            durable=True,
            mqtt5=True,  # the request API needs response topics and correlation data
            worker_threads=cfg.request_workers,
        )
        self.metrics = rt.metrics
        self.bus = rt.bus
        t = self.topics = rt.topics
        folder = rt.state_dir("memory")
        self.oplog = OpLog(folder / "oplog.db", synchronous=cfg.log_sync)
        self._pending: list[Record] = []
        self._oldest = 0.0
        self._retry_at = 0.0
        self._backoff = 0.0
        """0 while commits succeed; else the wait before the next try (doubling to its cap)."""
        self._commit_due: Alarm = rt.alarm(self._commit_when_due)
        self.context = ShortTermContext(
            max_entries=cfg.context_max_entries, max_bytes=cfg.context_max_mb * 1024 * 1024
        )
        self.checkpoints = Checkpoints(folder / "checkpoints.db")
        self.ltm = LongTermMemory(folder / "ltm", dim=cfg.vector_dim, track_changes=sync_on(settings))
        self.embedder, no_embedder = embedder_for(settings, report=rt.set_problems)
        if self.embedder is None and cfg.text_embeddings:
            rt.set_problems([no_embedder])  # everything else serves; text requests are refused
        self.api = MemoryApi(
            self.context,
            self.checkpoints,
            # its own connection: log-trace reads on the worker while the network thread appends
            OpLog(folder / "oplog.db", synchronous=cfg.log_sync),
            self.ltm,
            self.embedder,
            no_embedder=no_embedder,
            max_embed_tokens=cfg.max_embed_tokens,
        )
        self._lane: FairLane[_Request] = FairLane(
            total=cfg.request_queue, per_client=cfg.request_queue_per_client
        )
        self._running: set[str] = set()
        """Clients with a request on the worker (one each at most)."""
        self._waiting: dict[tuple[str, bytes], _Request] = {}
        self._answers = Answers(folder / "answers.db")
        rt.subscribe(
            t.all_memory_requests,
            self._on_request,
            ack=Ack.AFTER_OUTPUTS,
            counter="requests",
            lane="requests",
        )
        rt.subscribe(t.all_events, self._log("event"), contract=LOGGED, ack=Ack.AFTER_COMMIT)
        rt.subscribe(t.all_inference, self._log("score"), contract=LOGGED, ack=Ack.AFTER_COMMIT)
        # the agents' side of a reading's chain (docs/agents.md), so `outpost log trace` shows
        # reading -> event -> score -> decision -> escalation -> reply -> action -> result
        for pattern, kind in (
            (t.all_decisions, "decision"),
            (t.all_escalations, "escalation"),
            (t.all_escalation_replies, "reply"),
            (t.all_actions, "action"),
            (t.all_action_results, "result"),
        ):
            rt.subscribe(pattern, self._log(kind), contract=LOGGED, ack=Ack.AFTER_COMMIT)
        # a dead letter that is not JSON is still what happened: no contract, its bytes are kept
        rt.subscribe(t.all_dlq, self._log("dlq"), ack=Ack.AFTER_COMMIT)
        rt.every(5.0, lambda: self.metrics.inc("context_expired", self.context.sweep()))
        rt.after_reading(self._after_reading)
        rt.every(cfg.compact_s, self.compact)
        self._commit_hist = self.metrics.histogram("commit")
        self.sync = start_sync(rt, settings, self.oplog, self.ltm, folder)
        rt.extra_status = lambda: {
            "last_offset": self.oplog.last_offset,
            "bytes": self.oplog.size_bytes(),
            "forced_total": self.oplog.forced_total(),
            "text_embeddings": self.embedder is not None,
            **(self.sync.status() if self.sync else {"sync": "off"}),
        }

    # --- the request API -------------------------------------------------------------------------
    def _on_request(self, inbound: Inbound[bytes]) -> None:
        """One API request (MQTT 5), on the network thread: checked (its response topic, its
        operation), then queued for the worker, or answered at once when it cannot run."""
        props = getattr(inbound.msg, "properties", None)
        reply_to = getattr(props, "ResponseTopic", None)
        client = ""  # no response topic: nobody to answer; a refusal goes to the DLQ
        if reply_to is not None:
            try:
                client = self.topics.memory_response_client(str(reply_to))
            except TopicError as exc:
                self._refused("bad_response_topic")
                raise Rejected("bad_response_topic", f"not answered: {exc}") from None
        try:
            op = self.topics.memory_op(inbound.topic)
        except TopicError as exc:  # answered like any operation there is not
            self._answer(inbound, {"ok": False, "error": "unknown_op", "detail": str(exc)})
            return
        if len(inbound.raw) > MAX_REQUEST_BYTES:  # refused before it takes a place in the lane
            size = f"{len(inbound.raw)} bytes > {MAX_REQUEST_BYTES}"
            self._answer(inbound, {"ok": False, "error": "too_large", "detail": size})
            return
        corr = getattr(props, "CorrelationData", None)
        key = (str(reply_to), bytes(corr)) if reply_to and corr and self.api.has_effects(op) else None
        if key is not None and self._duplicate(key, inbound):
            return
        req = _Request(inbound, op, client, key)
        why = self._lane.offer(client, req)
        if why is not None:
            self._answer(inbound, {"ok": False, "error": "overloaded", "detail": why})
            return
        if key is not None:
            self._waiting[key] = req
        self.rt.hold(inbound.turn)  # while it waits; the worker's job holds it while it runs
        self._next()

    def _duplicate(self, key: tuple[str, bytes], inbound: Inbound[bytes]) -> bool:
        """A redelivered copy of a request with effects: answered as the first was, never run
        again (a missed keepalive makes the broker send again what was not yet acknowledged)."""
        answered = self._answers.get(key)
        waiting = self._waiting.get(key)
        if answered is None and waiting is None:
            return False
        self.metrics.counters["requests_redelivered"] += 1
        if answered is not None:
            self.rt.reply(inbound, answered)
        elif waiting is not None:
            self.rt.hold(inbound.turn)
            waiting.copies.append(inbound)
        return True

    def _next(self) -> None:
        """Hand waiting requests to the worker, one per worker thread and one per client at most:
        the worker's queue never closes the bus's read gate (which would stop the log too), and
        one client's burst leaves the other threads to the rest."""
        while len(self._running) < self.cfg.request_workers:
            taken = self._lane.take(busy=self._running)
            if taken is None:
                return
            self._running.add(taken[0])
            self._submit(taken[1])

    def _submit(self, req: _Request) -> None:
        inbound = req.inbound
        self.rt.submit(lambda: self._run(req), lambda result: self._done(req, result), for_=inbound.turn)
        self.rt.release(inbound.turn)  # the job holds it now

    def _run(self, req: _Request) -> tuple[Answer, bytes]:
        """On the worker: the request's answer, recorded (a request with effects) before it is
        published, so a copy redelivered even after a kill -9 is answered, not run again."""
        answer = self.api.handle(req.op, req.inbound.raw)
        payload = orjson.dumps(answer)
        if req.key is not None:
            self._answers.put(req.key, payload)
        return answer, payload

    def _done(self, req: _Request, result: tuple[Answer, bytes] | BaseException) -> None:
        self._running.discard(req.client)
        if isinstance(result, BaseException):  # a bug: answered, logged, dead-lettered
            log.error("request failed", exc_info=result, extra={"op": req.op})
            error = {"ok": False, "error": "internal", "detail": f"{type(result).__name__}: {result}"}
            result = error, orjson.dumps(error)
        payload = self._answer(req.inbound, *result)
        if req.key is not None:
            self._waiting.pop(req.key, None)
        for copy in req.copies:
            self.rt.reply(copy, payload)
            self.rt.release(copy.turn)
        if self.sync is not None:
            self.sync.pump_soon()  # what the request changed in long-term memory goes to the cloud
        self._next()

    def _answer(self, inbound: Inbound[bytes], answer: Answer, payload: bytes = b"") -> bytes:
        """Reply (the reply holds the request until confirmed); a refusal is counted, and
        dead-lettered when nobody can be told or an operator should see it."""
        payload = payload or orjson.dumps(answer)
        replied = self.rt.reply(inbound, payload)
        if not answer["ok"]:
            reason = answer["error"]
            self._refused(reason)
            if not replied or reason in DEAD_LETTERED or reason == "internal":
                self.rt.dead_letter(reason, answer["detail"], inbound.topic, inbound.raw, for_=inbound.turn)
        return payload

    def _refused(self, reason: str) -> None:
        c = self.metrics.counters
        c["requests_refused"] += 1
        c["requests_refused." + reason] += 1

    def _stop_requests(self) -> None:
        """At the stop: what still waits is answered ``overloaded`` (the client retries against
        the next memory) rather than held until the drain times out."""
        for req in self._lane.clear():
            for inbound in (req.inbound, *req.copies):
                self._answer(inbound, {"ok": False, "error": "overloaded", "detail": "memory is stopping"})
                self.rt.release(inbound.turn)
            if req.key is not None:
                self._waiting.pop(req.key, None)

    # --- the log ---------------------------------------------------------------------------------
    def _log(self, kind: str) -> Any:
        def on_message(inbound: Inbound[Any]) -> None:
            records = self._records(kind, inbound)
            if not self._pending:
                self._oldest = time.monotonic()
            self._pending.extend(records)
            self.metrics.counters[f"appended.{kind}"] += len(records)
            if len(self._pending) >= self.cfg.commit_max:
                self.commit()

        return on_message

    def _records(self, kind: str, inbound: Inbound[Any]) -> list[Record]:
        now = time.time_ns()
        topic, raw, items = inbound.topic[:512], inbound.raw, inbound.items
        if kind == "dlq":  # no contract: whatever a dead letter holds is what happened
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                doc = None
            if not isinstance(doc, dict):  # not one (a broken stage's): its bytes, with no trace
                return [Record(now, kind, "", topic, raw)]
            items = [(0, doc)]
        single = len(items) == 1
        out: list[Record] = []
        for _, item in items:
            ts, mid = item.get("ts"), item.get("id")
            trace = item.get("trace") or mid or ""
            out.append(
                Record(
                    ts if type(ts) is int and ts >= 0 else now,
                    kind,
                    trace if isinstance(trace, str) else str(trace)[:128],
                    topic,
                    raw if single else orjson.dumps(item),
                    # the id keeps a redelivered message from being logged twice; a kind of its
                    # own, as a dead letter may carry the id of the message it refused
                    f"{kind}:{mid}"[:160] if isinstance(mid, str) and mid else None,
                )
            )
        return out

    def _after_reading(self) -> None:
        """Once what waited on the socket is handled: entries are committed when the oldest has
        waited ``commit_ms`` (the thread is woken then, not polled); messages that made no entry
        (dead-lettered whole) are acknowledged as they are."""
        if self._pending:
            self._commit_soon()
        elif not self._commit_due.pending:
            self.rt.committed()

    def _commit_soon(self) -> None:
        at = self._oldest + self.cfg.commit_ms / 1000.0
        if self._backoff:
            at = max(at, self._retry_at)
        self._commit_due.soon(at - time.monotonic())

    def _commit_when_due(self) -> None:
        if self._pending:
            self.commit()
        else:
            self.rt.committed()
        if self._pending:  # a failed try (or one backing off): again when its backoff ends
            self._commit_soon()

    def commit(self, *, force: bool = False) -> None:
        """Append what waits, ``memory.commit_max`` entries a transaction; once all of it is
        written the messages it came from are acknowledged.

        A commit that fails acknowledges nothing (the broker keeps those messages, and sends no
        more than its in-flight window) and keeps its entries for the next try, after a backoff
        (``BACKOFF_S``, doubling). A full disk (:class:`DiskFull`) is reported by the kit as
        ``disk full``; the tries then write ``RETRY_CHUNK`` entries at a time and give the WAL's
        space back between them, so they resume by themselves as soon as a little space is freed.
        """
        if not force and self._backoff and time.monotonic() < self._retry_at:
            return
        records, self._pending = self._pending, []
        chunk = RETRY_CHUNK if self._backoff else self.cfg.commit_max
        done = 0
        start = time.perf_counter_ns()
        c = self.metrics.counters
        dups = self.oplog.duplicates
        try:
            while done < len(records):
                part = records[done : done + chunk]
                self.oplog.append(part)
                done += len(part)
                c["commits"] += 1
                if self._backoff:
                    self.oplog.store.checkpoint()
        except Exception as exc:  # noqa: BLE001 - log_failed_commit logs it, with its traceback
            # Not acknowledged: the broker redelivers them after a restart. Kept for the next try
            # in this process too, so a transient error (disk full, locked) loses nothing.
            self._pending = records[done:] + self._pending
            self._count_appended(done, dups)
            c["commit_failures"] += 1
            first = not self._backoff
            lo, hi = BACKOFF_S
            self._backoff = min(hi, self._backoff * 2) if self._backoff else lo
            self._retry_at = time.monotonic() + self._backoff
            if first:  # once per outage, not once per try: the log may be on the same disk
                log_failed_commit(log, "log", exc)
            return
        if self._backoff:
            log.info("log commits resumed", extra={"failures": c["commit_failures"]})
            self._backoff = 0.0
        self._commit_hist.record_ns(time.perf_counter_ns() - start)
        self._count_appended(len(records), dups)
        self.rt.committed()

    def _count_appended(self, written: int, duplicates_before: int) -> None:
        """Of ``written`` records, those the log took (``entries``) and the copies it left out."""
        c = self.metrics.counters
        dups = self.oplog.duplicates - duplicates_before
        c["entries"] += written - dups
        c["log_duplicates"] += dups

    def compact(self) -> None:
        """Retention and the disk budget (every ``memory.compact_s``); on a full disk it tries
        again next time (it frees space, but its deletes need a little to be written)."""
        try:
            self._compact()
        except DiskFull as exc:
            log.warning("compaction failed: disk full", extra={"error": str(exc)})

    def _compact(self) -> None:
        cfg = self.cfg
        ev = self.ltm.evict(max_age_s=cfg.ltm_max_age_s, max_items=cfg.ltm_max_items)
        self.metrics.counters["ltm_evicted"] += ev.expired + ev.aged + ev.over_budget
        result = self.oplog.compact(max_age_s=cfg.retention_s, max_bytes=cfg.budget_mb * 1024 * 1024)
        if self.sync is not None:
            self.sync.compact()
            if ev.expired + ev.aged + ev.over_budget:
                self.sync.pump_soon()  # the evictions' deletions go to the cloud's replica
        c = self.metrics.counters
        c["compacted"] += result.removed
        if result.forced:
            c["forced"] += result.forced
            log.warning(
                "disk budget forced removal of unacknowledged log entries",
                extra={"forced": result.forced, "budget_mb": cfg.budget_mb},
            )

    # --- lifecycle -------------------------------------------------------------------------------
    def _drain(self) -> None:
        self._stop_requests()
        self.commit(force=True)

    def start(self) -> None:
        self.rt.start()
        log.info("memory started", extra={"last_offset": self.oplog.last_offset})

    def stop(self) -> None:
        """Drain: stop intake, commit what waits (and acknowledge it), go offline, close the state."""
        self.rt.stop(self._drain)
        self.oplog.close()
        if self.api.oplog is not None:
            self.api.oplog.close()
        self.checkpoints.close()
        self._answers.close()
        if self.sync is not None:
            self.sync.close()
        self.ltm.close()
        log.info("memory stopped", extra={"counters": dict(self.metrics.counters)})


def run(settings: OutpostSettings, stop: threading.Event) -> MemoryService:
    """Run memory until ``stop`` is set; returns the (stopped) service for inspection."""
    return run_until(MemoryService(settings), stop)


def main() -> None:
    service_main(MemoryService, OutpostSettings)
