"""The memory service: the site's operational log, and the home of short-term context, checkpoints,
long-term memory (with text embeddings), the MQTT 5 request API and sync to the cloud (docs/memory.md).

For the log, it subscribes to what the other services publish (events, scores, dead letters) at QoS 1 with a
durable session and manual acknowledgement, appends one log entry per event, score or dead letter,
and commits in batches (``memory.commit_ms`` or ``memory.commit_max``, whichever comes first). A
message is acknowledged only after the batch holding it is committed: kill -9 at any point leaves
the unacknowledged messages on the broker, which redelivers them, so nothing published is missing
from the log (a redelivered message may be logged twice, with the same trace and body; readers that
care drop it by the body's ``id``). Everything runs on the bus's network thread, as in ingest.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from outpost.bus import Message, topic_of
from outpost.log import get_logger
from outpost.service import ServiceRuntime, run_until, service_main
from outpost.services.memory.api import MemoryApi
from outpost.services.memory.checkpoints import Checkpoints
from outpost.services.memory.context import ShortTermContext
from outpost.services.memory.embedding.embedder import embedder_for
from outpost.services.memory.oplog import OpLog, Record
from outpost.services.memory.sync import start_sync, sync_mode
from outpost.services.memory.vectors import LongTermMemory
from outpost.settings import OutpostSettings

NAME = "memory"
log = get_logger("outpost.memory")

MAX_PAYLOAD = 4_000_000


class MemoryService:
    def __init__(self, settings: OutpostSettings) -> None:
        self.settings = settings
        cfg = self.cfg = settings.memory
        self.rt = ServiceRuntime(
            NAME,
            settings,
            durable=True,
            manual_ack=True,
            tick_s=min(0.05, cfg.commit_ms / 2000.0),
            mqtt5=True,  # the request API needs response topics and correlation data
        )
        self.metrics = self.rt.metrics
        self.bus = self.rt.bus
        t = self.topics = self.rt.topics
        self.oplog = OpLog(Path(settings.data_dir) / "memory" / "oplog.db", synchronous=cfg.log_sync)
        self._pending: list[Record] = []
        self._acks: list[tuple[int, int]] = []
        self._oldest = 0.0
        self.context = ShortTermContext(max_entries=cfg.context_max_entries)
        self.checkpoints = Checkpoints(Path(settings.data_dir) / "memory" / "checkpoints.db")
        self.ltm = LongTermMemory(
            Path(settings.data_dir) / "memory" / "ltm",
            dim=cfg.vector_dim,
            track_changes=sync_mode(settings) != "off",
        )
        self.embedder, no_embedder = embedder_for(settings)
        if self.embedder is None and cfg.text_embeddings:
            self.rt.set_problems([no_embedder])  # everything else serves; text requests are refused
        self.api = MemoryApi(
            self.context, self.checkpoints, self.oplog, self.ltm, self.embedder, no_embedder=no_embedder
        )
        self._req_root = t.root + "/memory/req/"
        self.bus.subscribe(t.all_memory_requests, self._on_request, qos=1)
        self.bus.every(5.0, lambda: self.metrics.inc("context_expired", self.context.sweep()))
        kinds = (("event", t.all_events), ("score", t.all_inference), ("dlq", t.all_dlq))
        for kind, pattern in kinds:
            self.bus.subscribe(pattern, self._handler(kind), qos=1)
        self.bus.every(cfg.commit_ms / 2000.0, self._commit_if_due)
        self.bus.every(cfg.compact_s, self.compact)
        self._commit_hist = self.metrics.histogram("commit")
        self.sync = start_sync(self.rt, self.oplog, self.ltm, Path(settings.data_dir) / "memory")
        self.rt.extra_status = lambda: {
            "last_offset": self.oplog.last_offset,
            "bytes": self.oplog.size_bytes(),
            "forced_total": self.oplog.forced_total(),
            "text_embeddings": self.embedder is not None,
            **(self.sync.status() if self.sync else {"sync": "off"}),
        }

    def _on_request(self, msg: Message) -> None:
        """One API request (MQTT 5): answered on its response topic with its correlation data; a
        refused request without a response topic goes to the DLQ. Acknowledged once answered."""
        c = self.metrics.counters
        c["requests"] += 1
        topic = msg.topic
        op = topic[len(self._req_root) :] if topic.startswith(self._req_root) else ""
        answer = self.api.handle(op, bytes(msg.payload))
        if not answer["ok"]:
            c["requests_refused"] += 1
            c["requests_refused." + answer["error"]] += 1
        props = getattr(msg, "properties", None)
        reply_to = getattr(props, "ResponseTopic", None)
        if reply_to:
            out = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            corr = getattr(props, "CorrelationData", None)
            if corr is not None:
                out.CorrelationData = corr
            self.bus.publish(str(reply_to), orjson.dumps(answer), qos=1, properties=out)
        elif not answer["ok"]:
            self.rt.dead_letter(answer["error"], answer["detail"], topic, bytes(msg.payload))
        if msg.qos:
            self.bus.ack(msg.mid, msg.qos)

    def _handler(self, kind: str) -> Any:
        def on_message(msg: Message) -> None:
            self._take(kind, msg)

        return on_message

    def _take(self, kind: str, msg: Message) -> None:
        c = self.metrics.counters
        c["messages"] += 1
        topic = topic_of(msg)
        raw = bytes(msg.payload)
        if not self._pending and not self._acks:
            self._oldest = time.monotonic()
        if msg.qos:
            self._acks.append((msg.mid, msg.qos))
        records = self._records(kind, topic, raw)
        if records is None:
            return
        self._pending.extend(records)
        c[f"appended.{kind}"] += len(records)
        if len(self._pending) >= self.cfg.commit_max:
            self.commit()

    def _records(self, kind: str, topic: str, raw: bytes) -> list[Record] | None:
        now = time.time_ns()
        if len(raw) > MAX_PAYLOAD:
            self.rt.dead_letter("too_large", f"{len(raw)} bytes > {MAX_PAYLOAD}", topic, raw)
            return None
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if kind == "dlq":  # a dead letter that is not JSON is still what happened: keep its bytes
                return [Record(now, kind, "", topic, raw)]
            self.rt.dead_letter("not_json", f"not JSON: {exc}", topic, raw)
            return None
        items = doc if isinstance(doc, list) else [doc]
        out: list[Record] = []
        for item in items:
            if not isinstance(item, dict):
                self.rt.dead_letter("wrong_shape", f"a {kind} must be a JSON object", topic, raw)
                continue
            ts = item.get("ts")
            trace = item.get("trace") or item.get("id") or ""
            out.append(
                Record(
                    ts if type(ts) is int and ts >= 0 else now,
                    kind,
                    trace if isinstance(trace, str) else str(trace)[:128],
                    topic[:512],
                    orjson.dumps(item) if len(items) > 1 else raw,
                )
            )
        return out

    def _commit_if_due(self) -> None:
        if (self._acks or self._pending) and (time.monotonic() - self._oldest) * 1000.0 >= self.cfg.commit_ms:
            self.commit()

    def commit(self) -> None:
        """Append what waits in one transaction, then acknowledge the messages it came from."""
        records, self._pending = self._pending, []
        acks, self._acks = self._acks, []
        start = time.perf_counter_ns()
        try:
            self.oplog.append(records)
        except Exception:
            # Not acknowledged: the broker redelivers them after a restart. Keep them for the next
            # try in this process too, so a transient error (disk full, locked) loses nothing.
            log.exception("log commit failed; will retry")
            self.metrics.counters["commit_failures"] += 1
            self._pending = records + self._pending
            self._acks = acks + self._acks
            return
        self._commit_hist.record_ns(time.perf_counter_ns() - start)
        c = self.metrics.counters
        c["commits"] += 1
        c["entries"] += len(records)
        for mid, qos in acks:
            self.bus.ack(mid, qos)

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

    def start(self) -> None:
        self.rt.start()
        log.info("memory started", extra={"last_offset": self.oplog.last_offset})

    def stop(self) -> None:
        """Drain: commit what waits (and acknowledge it), go offline, close the log."""
        self.bus.call(self.commit, timeout_s=10)
        self.rt.stop()
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
    service_main(MemoryService)
