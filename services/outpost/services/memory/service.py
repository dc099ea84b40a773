"""The memory service: the site's operational log, and the home of short-term context, checkpoints,
long-term memory (with text embeddings), the MQTT 5 request API and sync to the cloud (docs/memory.md).

For the log, it takes what the other services publish (events, scores, dead letters) at QoS 1 with a
durable session, appends one log entry per event, score or dead letter, and commits in batches
(``memory.commit_ms`` or ``memory.commit_max``, whichever comes first). The log's subscriptions are
acknowledged after the commit (:attr:`Ack.AFTER_COMMIT`): kill -9 at any point leaves what was not
committed unacknowledged on the broker, which redelivers it, so nothing published is missing from
the log (a redelivered message may be logged twice, with the same trace and body; readers that
care drop it by the body's ``id``). Requests are acknowledged once their answer is confirmed.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

from outpost.contracts import Contract
from outpost.errors import TopicError
from outpost.log import get_logger
from outpost.service import Ack, Inbound, ServiceRuntime, run_until, service_main
from outpost.services.memory.api import MemoryApi
from outpost.services.memory.checkpoints import Checkpoints
from outpost.services.memory.context import ShortTermContext
from outpost.services.memory.embedding.embedder import embedder_for
from outpost.services.memory.oplog import OpLog, Record
from outpost.services.memory.sync import start_sync, sync_mode
from outpost.services.memory.vectors import LongTermMemory
from outpost.services.registry import OutpostSettings
from outpost.streams import REASONS as STREAM_REASONS

NAME = "memory"
log = get_logger("outpost.memory")

REASONS = ("unknown_op", "bad_request", "conflict", "no_embedder", *STREAM_REASONS)
"""The request API's refusals (services/outpost/services/memory/api.py) and sync's."""


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
            tick_s=min(0.05, cfg.commit_ms / 2000.0),
            mqtt5=True,  # the request API needs response topics and correlation data
        )
        self.metrics = rt.metrics
        self.bus = rt.bus
        t = self.topics = rt.topics
        folder = rt.state_dir("memory")
        self.oplog = OpLog(folder / "oplog.db", synchronous=cfg.log_sync)
        self._pending: list[Record] = []
        self._oldest = 0.0
        self.context = ShortTermContext(max_entries=cfg.context_max_entries)
        self.checkpoints = Checkpoints(folder / "checkpoints.db")
        self.ltm = LongTermMemory(
            folder / "ltm", dim=cfg.vector_dim, track_changes=sync_mode(settings) != "off"
        )
        self.embedder, no_embedder = embedder_for(settings)
        if self.embedder is None and cfg.text_embeddings:
            rt.set_problems([no_embedder])  # everything else serves; text requests are refused
        self.api = MemoryApi(
            self.context, self.checkpoints, self.oplog, self.ltm, self.embedder, no_embedder=no_embedder
        )
        rt.subscribe(t.all_memory_requests, self._on_request, ack=Ack.AFTER_OUTPUTS, counter="requests")
        rt.subscribe(t.all_events, self._log("event"), contract=LOGGED, ack=Ack.AFTER_COMMIT)
        rt.subscribe(t.all_inference, self._log("score"), contract=LOGGED, ack=Ack.AFTER_COMMIT)
        # a dead letter that is not JSON is still what happened: no contract, its bytes are kept
        rt.subscribe(t.all_dlq, self._log("dlq"), ack=Ack.AFTER_COMMIT)
        rt.every(5.0, lambda: self.metrics.inc("context_expired", self.context.sweep()))
        rt.every(cfg.commit_ms / 2000.0, self._commit_if_due)
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
        """One API request (MQTT 5): answered on its response topic with its correlation data; a
        refused request without a response topic goes to the DLQ."""
        try:
            op = self.topics.memory_op(inbound.topic)
        except TopicError as exc:  # answered like any operation there is not
            answer: dict[str, Any] = {"ok": False, "error": "unknown_op", "detail": str(exc)}
        else:
            answer = self.api.handle(op, inbound.raw)
        if not answer["ok"]:
            c = self.metrics.counters
            c["requests_refused"] += 1
            c["requests_refused." + answer["error"]] += 1
        if not self.rt.reply(inbound, orjson.dumps(answer)) and not answer["ok"]:
            self.rt.dead_letter(
                answer["error"], answer["detail"], inbound.topic, inbound.raw, for_=inbound.turn
            )

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
            ts = item.get("ts")
            trace = item.get("trace") or item.get("id") or ""
            out.append(
                Record(
                    ts if type(ts) is int and ts >= 0 else now,
                    kind,
                    trace if isinstance(trace, str) else str(trace)[:128],
                    topic,
                    raw if single else orjson.dumps(item),
                )
            )
        return out

    def _commit_if_due(self) -> None:
        if self._pending:
            if (time.monotonic() - self._oldest) * 1000.0 >= self.cfg.commit_ms:
                self.commit()
        else:
            self.rt.committed()  # messages that made no entry (dead-lettered whole): nothing to write

    def commit(self) -> None:
        """Append what waits in one transaction; the messages it came from are then acknowledged."""
        records, self._pending = self._pending, []
        start = time.perf_counter_ns()
        try:
            self.oplog.append(records)
        except Exception:
            # Not acknowledged: the broker redelivers them after a restart. Keep them for the next
            # try in this process too, so a transient error (disk full, locked) loses nothing.
            log.exception("log commit failed; will retry")
            self.metrics.counters["commit_failures"] += 1
            self._pending = records + self._pending
            return
        self._commit_hist.record_ns(time.perf_counter_ns() - start)
        c = self.metrics.counters
        c["commits"] += 1
        c["entries"] += len(records)
        self.rt.committed()

    def compact(self) -> None:
        cfg = self.cfg
        ev = self.ltm.evict(max_age_s=cfg.ltm_max_age_s, max_items=cfg.ltm_max_items)
        self.metrics.counters["ltm_evicted"] += ev.expired + ev.aged + ev.over_budget
        result = self.oplog.compact(max_age_s=cfg.retention_s, max_bytes=cfg.budget_mb * 1024 * 1024)
        if self.sync is not None:
            self.sync.compact()
        c = self.metrics.counters
        c["compacted"] += result.removed
        if result.forced:
            c["forced"] += result.forced
            log.warning(
                "disk budget forced removal of unacknowledged log entries",
                extra={"forced": result.forced, "budget_mb": cfg.budget_mb},
            )

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.rt.start()
        log.info("memory started", extra={"last_offset": self.oplog.last_offset})

    def stop(self) -> None:
        """Drain: stop intake, commit what waits (and acknowledge it), go offline, close the state."""
        self.rt.stop(self.commit)
        self.oplog.close()
        self.checkpoints.close()
        if self.sync is not None:
            self.sync.close()
        self.ltm.close()
        log.info("memory stopped", extra={"counters": dict(self.metrics.counters)})


def run(settings: OutpostSettings, stop: threading.Event) -> MemoryService:
    """Run memory until ``stop`` is set; returns the (stopped) service for inspection."""
    return run_until(MemoryService(settings), stop)


def main() -> None:
    service_main(MemoryService, OutpostSettings)
