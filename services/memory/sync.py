"""Memory sync, the site's side: long-term memory and the log's summaries, replicated to the cloud.

Two streams, each a sequence of records with offsets that only grow, kept in SQLite until the
cloud has acknowledged them:

* ``ltm``: every change of long-term memory (an item added, with its vector; an item removed, by
  eviction, TTL or a privacy request), written by a trigger in the same transaction as the change
  (:meth:`LongTermMemory.changes_after`), so the replica follows the device exactly;
* ``log``: a summary of the operational log every ``memory.summary_s`` (entries per kind and per
  topic over an offset range, :meth:`OpLog.summary`): the log itself stays on the site, what it
  amounts to goes up. The log keeps what is not yet summarised (consumer ``sync``).

Records go up on ``{root}/up/memory/{stream}`` (QoS 1, ``memory.sync_batch`` per message), each
message saying the offset before its first record (``prev``). The cloud (:mod:`.replica`) applies a
record only if it follows the last one it holds, drops what it already holds (replays are
harmless), and acknowledges on ``{root}/down/memory/ack`` the last offset it has *stored*: a
PUBACK from a broker or a bridge is not taken as delivery. The site then forgets what was
acknowledged. At most ``memory.sync_window`` offsets are in flight; with no acknowledgement for
``memory.sync_resend_s``, or when the uplink comes back, sending starts again from the last
acknowledged offset (go-back-N), which is also where a restarted service resumes.

"When the uplink is there": with ``memory.sync: uplink`` records are sent only while the edge
broker's bridge reports itself connected (:meth:`Topics.uplink_state`); ``auto`` (the default) is
``uplink`` when ``uplink.cloud`` is set and ``off`` when it is not; ``always`` sends regardless (a
cloud broker reached some other way); ``off`` keeps nothing for the cloud.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from outpost.bus import Message
from outpost.log import get_logger
from outpost.service import ServiceRuntime
from outpost.services.memory.oplog import OpLog
from outpost.services.memory.vectors import LongTermMemory
from outpost.settings import OutpostSettings
from outpost.store import Store, sequence

log = get_logger("outpost.memory.sync")

PART = "memory"
LOG_CONSUMER = "sync"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS acked (
    stream TEXT PRIMARY KEY,
    "offset" INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS summaries (
    "offset" INTEGER PRIMARY KEY AUTOINCREMENT,
    log_to INTEGER NOT NULL,
    made_ns INTEGER NOT NULL,
    doc BLOB NOT NULL
);
"""


class Source(Protocol):
    """A stream's records, from durable state."""

    def after(self, offset: int, limit: int) -> list[tuple[int, dict[str, Any]]]: ...
    def trim(self, upto: int) -> None: ...
    def last(self) -> int: ...
    def expire(self, before_ns: int) -> int: ...
    def snapshot(self) -> int: ...


@dataclass
class _LtmSource:
    ltm: LongTermMemory

    def after(self, offset: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        return self.ltm.changes_after(offset, limit)

    def trim(self, upto: int) -> None:
        self.ltm.trim_changes(upto)

    def last(self) -> int:
        return self.ltm.last_change()

    def expire(self, before_ns: int) -> int:
        return self.ltm.expire_changes(before_ns)

    def snapshot(self) -> int:
        return self.ltm.snapshot_changes()


@dataclass
class _SummarySource:
    store: Store

    def after(self, offset: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        rows = self.store.query(
            'SELECT "offset", doc FROM summaries WHERE "offset" > ? ORDER BY "offset" LIMIT ?',
            (offset, limit),
        )
        return [(int(o), orjson.loads(d)) for o, d in rows]

    def trim(self, upto: int) -> None:
        self.store.db.execute('DELETE FROM summaries WHERE "offset" <= ?', (upto,))

    def last(self) -> int:
        return sequence(self.store.db, "summaries")

    def expire(self, before_ns: int) -> int:
        return self.store.db.execute("DELETE FROM summaries WHERE made_ns < ?", (before_ns,)).rowcount

    def snapshot(self) -> int:
        return 0  # a summary the cloud acknowledged was forgotten: it cannot be made again


@dataclass
class _Stream:
    name: str
    source: Source
    acked: int
    sent: int
    progress_at: float


class Ack(BaseModel):
    """The cloud's acknowledgement: everything of ``stream`` up to ``offset`` is stored there."""

    model_config = ConfigDict(extra="ignore", strict=True)
    stream: str = Field(max_length=16)
    offset: int = Field(ge=0)
    epoch: str = Field(max_length=64)
    unknown: bool = False
    """The replica holds nothing of this stream's history (it lost its state): send it all again."""


class MemorySync:
    """Runs on the memory service's bus thread (every call here is made from it)."""

    def __init__(self, rt: ServiceRuntime, oplog: OpLog, ltm: LongTermMemory, folder: Path) -> None:
        cfg = self.cfg = rt.settings.memory
        self.rt = rt
        self.bus = rt.bus
        self.topics = rt.topics
        self.metrics = rt.metrics
        self.oplog = oplog
        self.store = Store(folder / "sync.db", _SCHEMA, synchronous="FULL")
        oplog.register(LOG_CONSUMER)
        self.epoch = self._epoch(ltm)
        acked = {str(s): int(o) for s, o in self.store.query('SELECT stream, "offset" FROM acked')}
        now = time.monotonic()
        sources: dict[str, Source] = {"ltm": _LtmSource(ltm), "log": _SummarySource(self.store)}
        self.streams = {
            name: _Stream(name, src, acked.get(name, 0), acked.get(name, 0), now)
            for name, src in sources.items()
        }
        mode = sync_mode(rt.settings)
        self.link_up = mode == "always"
        self._final: dict[str, Any] | None = None
        self._root = self.topics.root + "/"
        self.bus.subscribe(self.topics.down(PART, "ack"), self._on_ack, qos=1)
        if mode == "uplink":
            self.bus.subscribe(self.topics.uplink_state(), self._on_link, qos=1)
        self.bus.every(min(0.2, cfg.sync_resend_s / 4), self.pump)
        self.bus.every(cfg.summary_s, self.summarize)

    def _epoch(self, ltm: LongTermMemory) -> str:
        """This sync state's id, sent with every message. A new one (and the whole of long-term
        memory queued again) when there was no sync state, or long-term memory was not recording
        its changes (sync was off): the replica then drops what it held of this site's long-term
        memory and takes the new history from its start, so a wiped or replaced gateway, or one
        whose sync was off for a while, never leaves the cloud holding a different memory."""
        row = self.store.query("SELECT value FROM meta WHERE key = 'epoch'")
        if row and not ltm.tracking_started:
            return str(row[0][0])
        epoch = uuid.uuid4().hex
        self.store.db.execute("DELETE FROM acked")
        self.store.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
        n = ltm.snapshot_changes()
        log.info("sync starts afresh", extra={"epoch": epoch, "items_to_replicate": n})
        return epoch

    # --- the log's summaries --------------------------------------------------------------------
    def summarize(self) -> None:
        """Summarise the log entries since the last summary into one ``log`` record."""
        row = self.store.query("SELECT max(log_to) FROM summaries")
        done = max(int(row[0][0] or 0), self.oplog.position(LOG_CONSUMER))
        upto = self.oplog.last_offset
        if upto <= done:
            return
        doc = self.oplog.summary(done, upto)
        by_topic: dict[str, int] = doc["by_topic"]  # type: ignore[assignment]
        doc["by_topic"] = {t.removeprefix(self._root): n for t, n in by_topic.items()}
        self.store.db.execute(
            "INSERT INTO summaries (log_to, made_ns, doc) VALUES (?, ?, ?)",
            (upto, time.time_ns(), orjson.dumps(doc)),
        )
        self.oplog.ack(LOG_CONSUMER, upto)  # after the summary is stored: a crash between redoes nothing
        self.metrics.counters["sync_summaries"] += 1

    # --- sending --------------------------------------------------------------------------------
    def pump(self) -> None:
        """Send what the window allows; go back to the last acknowledged offset on a timeout."""
        if not self.link_up:
            return
        now = time.monotonic()
        c = self.metrics.counters
        for st in self.streams.values():
            if st.sent > st.acked and now - st.progress_at > self.cfg.sync_resend_s:
                st.sent = st.acked
                st.progress_at = now
                c["sync_resends"] += 1
            while (room := self.cfg.sync_window - (st.sent - st.acked)) > 0:
                records = st.source.after(st.sent, min(self.cfg.sync_batch, room))
                if not records:
                    break
                if st.sent == st.acked:
                    st.progress_at = now  # the clock for an answer starts with the first in flight
                self._send(st, records)

    def _send(self, st: _Stream, records: list[tuple[int, dict[str, Any]]]) -> None:
        first, last = records[0][0], records[-1][0]
        msg = {
            "v": 1,
            "id": f"{self.topics.site}-{st.name}-{first}-{last}",
            "ts": time.time_ns(),
            "site": self.topics.site,
            "epoch": self.epoch,
            "stream": st.name,
            "prev": st.sent,
            "records": records,
        }
        self.bus.publish(self.topics.up(PART, st.name), orjson.dumps(msg), qos=1)
        st.sent = last
        c = self.metrics.counters
        c[f"sync_sent.{st.name}"] += len(records)
        c["sync_messages"] += 1

    # --- what comes back -------------------------------------------------------------------------
    def _on_ack(self, msg: Message) -> None:
        raw = bytes(msg.payload)
        try:
            ack = Ack.model_validate_json(raw)
            st = self._stream_of(ack)
        except (ValidationError, ValueError) as exc:
            self.rt.dead_letter("bad_ack", str(exc)[:500], msg.topic, raw)
        else:
            if ack.epoch != self.epoch:  # about a sync state this site no longer has: harmless
                self.metrics.counters["sync_stale_acks"] += 1
            elif ack.unknown:
                self._again(st)
            else:
                self._acknowledged(st, ack.offset)
        if msg.qos:
            self.bus.ack(msg.mid, msg.qos)

    def _stream_of(self, ack: Ack) -> _Stream:
        """The stream an acknowledgement is about; ValueError for one this site never sent."""
        st = self.streams.get(ack.stream)
        if st is None:
            raise ValueError(f"unknown stream {ack.stream[:16]!r}")
        if ack.epoch == self.epoch and ack.offset > st.source.last():
            raise ValueError(f"{ack.stream}: offset {ack.offset} was never sent (last {st.source.last()})")
        return st

    def _again(self, st: _Stream) -> None:
        """The replica lost this stream's history: send it again from the start (long-term memory
        whole, as a snapshot; summaries that were already acknowledged and forgotten are gone)."""
        if st.acked == 0:
            st.sent = 0  # nothing was forgotten here: resending from the start is enough
            return
        n = st.source.snapshot()
        self.store.db.execute("DELETE FROM acked WHERE stream = ?", (st.name,))
        log.warning(
            "the cloud replica lost this stream: sending it again from its start",
            extra={"stream": st.name, "was_acked": st.acked, "items_again": n},
        )
        st.acked = st.sent = 0
        st.progress_at = time.monotonic()
        self.metrics.counters[f"sync_again.{st.name}"] += 1

    def _acknowledged(self, st: _Stream, offset: int) -> None:
        if offset <= st.acked:
            return  # an old or repeated acknowledgement
        self.store.db.execute(
            'INSERT INTO acked (stream, "offset") VALUES (?, ?) ON CONFLICT(stream) DO UPDATE SET '
            '"offset" = max("offset", excluded."offset")',
            (st.name, offset),
        )
        st.source.trim(offset)
        self.metrics.counters[f"sync_acked.{st.name}"] += offset - st.acked
        st.acked = offset
        st.sent = max(st.sent, offset)
        st.progress_at = time.monotonic()

    def _on_link(self, msg: Message) -> None:
        up = bytes(msg.payload).strip() == b"1"
        was, self.link_up = self.link_up, up
        if up and not was:
            for st in self.streams.values():  # what was sent while the link flapped may be lost
                st.sent = st.acked
                st.progress_at = time.monotonic()
            log.info("uplink up: syncing from the last acknowledged offsets", extra=self.status())
        elif not up and was:
            log.info("uplink down: sync waits", extra=self.status())
        self.metrics.counters["uplink_changes"] += 1
        if msg.qos:
            self.bus.ack(msg.mid, msg.qos)

    def compact(self) -> None:
        """Records the cloud has not taken within ``memory.retention_s`` go (counted and logged): a
        site whose uplink stays down keeps a bounded backlog, like its log."""
        cutoff = time.time_ns() - int(self.cfg.retention_s * 1e9)
        for st in self.streams.values():
            n = st.source.expire(cutoff)
            if n:  # the replica misses these: counted and logged, as the log's forced removals are
                self.metrics.counters[f"sync_expired.{st.name}"] += n
                log.warning(
                    "sync records expired before the cloud took them", extra={"stream": st.name, "records": n}
                )

    def status(self) -> dict[str, Any]:
        """What the service's status shows: the link, and per stream the backlog not yet in the cloud."""
        if self._final is not None:
            return self._final
        return {
            "uplink": self.link_up,
            **{
                f"sync_{st.name}": {"acked": st.acked, "backlog": st.source.last() - st.acked}
                for st in self.streams.values()
            },
        }

    def close(self) -> None:
        self._final = self.status()  # what it was at the stop, still readable after
        self.store.close()


def sync_mode(settings: OutpostSettings) -> Literal["uplink", "always", "off"]:
    """``memory.sync`` with ``auto`` resolved: a site without an uplink keeps nothing for a cloud."""
    mode = settings.memory.sync
    if mode == "auto":
        return "uplink" if settings.uplink.cloud else "off"
    return mode


def start_sync(rt: ServiceRuntime, oplog: OpLog, ltm: LongTermMemory, folder: Path) -> MemorySync | None:
    """The sync of this memory, or None when it is off."""
    if sync_mode(rt.settings) == "off":
        return None
    return MemorySync(rt, oplog, ltm, folder)
