"""Memory sync, the site's side: long-term memory and the log's summaries, replicated to the cloud.

Two offset streams (:mod:`outpost.streams`: resent until the cloud acknowledges what it stored,
with epochs), kept in SQLite until the cloud has them:

* ``ltm``: every change of long-term memory (an item added, with its vector; an item removed, by
  eviction, TTL or a privacy request), written by a trigger in the same transaction as the change
  (:meth:`LongTermMemory.changes_after`), so the replica follows the device exactly;
* ``log``: a summary of the operational log every ``memory.summary_s`` (entries per kind and per
  topic over an offset range, :meth:`OpLog.summary`): the log itself stays on the site, what it
  amounts to goes up. The log keeps what is not yet summarised (consumer ``sync``).

Records are handed to the uplink service on ``{root}/outbox/memory/{stream}`` (the site's own
broker, :func:`outpost.streams.outbox_hop`), ``memory.sync_batch`` a message, at most
``memory.sync_window`` offsets in flight, resent after ``memory.sync_resend_s`` without an
acknowledgement on ``{root}/outbox/memory/{stream}/ack``: the uplink acknowledges what its outbox
holds on disk, takes it to the cloud with its other streams (:mod:`outpost.services.uplink.relay`),
and the cloud side applies it to the replica (:mod:`.replica`).

A new epoch (and the whole of long-term memory queued again) is taken when there was no sync
state, or long-term memory was not recording its changes (sync was off): the replica then drops
what it held of this site's long-term memory and takes the new history from its start, so a wiped
or replaced gateway, or one whose sync was off for a while, never leaves the cloud holding a
different memory. The same happens, within the epoch, when the uplink's outbox lost memory's
records (its disk budget, its age limit, a cloud side that lost its state): it answers ``unknown``
and memory sends its whole long-term memory again.

``memory.sync``: ``auto`` (the default) syncs when ``uplink.cloud`` is set (the uplink service then
runs), ``off`` keeps nothing for the cloud.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from outpost.log import get_logger
from outpost.service import ServiceRuntime
from outpost.services.memory.oplog import OpLog
from outpost.services.memory.vectors import LongTermMemory
from outpost.services.registry import OutpostSettings
from outpost.store import Store, sequence, transaction
from outpost.streams import SENDER_SCHEMA, OffsetStreams, Records, outbox_hop

log = get_logger("outpost.memory.sync")

PART = "memory"
LOG_CONSUMER = "sync"

_SCHEMA = (
    SENDER_SCHEMA
    + """
CREATE TABLE IF NOT EXISTS summaries (
    "offset" INTEGER PRIMARY KEY AUTOINCREMENT,
    log_to INTEGER NOT NULL,
    made_ns INTEGER NOT NULL,
    doc BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS summaries_made ON summaries (made_ns);
CREATE TABLE IF NOT EXISTS summarized (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    log_to INTEGER NOT NULL
);
"""
)


EXPIRE_SUMMARIES = "DELETE FROM summaries WHERE made_ns < ?"
"""Summaries the cloud never took within the retention go (through summaries_made)."""

SUMMARIZED = (
    "SELECT max(coalesce((SELECT log_to FROM summarized WHERE id = 0), 0), "
    'coalesce((SELECT log_to FROM summaries WHERE "offset" = (SELECT max("offset") FROM summaries)), 0))'
)
"""Where the last summary ends: the mark, or the newest summary (a store from before the mark
existed). Two lookups, not a scan of every summary kept (run each ``memory.summary_s`` on the
network thread; a week's backlog of the uplink being down is 10,000); ``log_to`` grows with the
offset."""


@dataclass
class _LtmSource:
    ltm: LongTermMemory

    def after(self, offset: int, limit: int) -> Records:
        return self.ltm.changes_after(offset, limit)

    def trim(self, upto: int) -> None:
        self.ltm.trim_changes(upto)

    def last(self) -> int:
        return self.ltm.last_change()

    def expire(self, before_ns: int) -> int:
        return self.ltm.expire_changes(before_ns)

    def snapshot(self) -> int:
        return self.ltm.snapshot_changes()

    def pending(self, after: int) -> tuple[int, int | None]:
        return self.ltm.pending_changes(after)


@dataclass
class Summaries:
    store: Store

    def after(self, offset: int, limit: int) -> Records:
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
        return self.store.db.execute(EXPIRE_SUMMARIES, (before_ns,)).rowcount

    def snapshot(self) -> int:
        return 0  # a summary the cloud acknowledged was forgotten: it cannot be made again

    def pending(self, after: int) -> tuple[int, int | None]:
        n, oldest = self.store.query(
            'SELECT COUNT(*), MIN(made_ns) FROM summaries WHERE "offset" > ?', (after,)
        )[0]
        return int(n), None if oldest is None else int(oldest)

    def summarized(self) -> int:
        """The log offset the last summary ends at. Kept apart from the summaries, which go once
        the cloud has them: the log's own mark (its ``sync`` consumer) is moved after the summary is
        stored, so a crash in between would otherwise make the next summary start again from it."""
        return int(self.store.query(SUMMARIZED)[0][0])

    def add(self, upto: int, doc: bytes) -> None:
        """Store the summary of the log up to ``upto`` and move the mark, in one transaction."""
        with transaction(self.store.db) as db:
            db.execute(
                "INSERT INTO summaries (log_to, made_ns, doc) VALUES (?, ?, ?)", (upto, time.time_ns(), doc)
            )
            db.execute("INSERT OR REPLACE INTO summarized (id, log_to) VALUES (0, ?)", (upto,))


class MemorySync:
    """Runs on the memory service's bus thread (every call here is made from it)."""

    def __init__(
        self, rt: ServiceRuntime, settings: OutpostSettings, oplog: OpLog, ltm: LongTermMemory, folder: Path
    ) -> None:
        cfg = self.cfg = settings.memory
        self.metrics = rt.metrics
        self.oplog = oplog
        self.store = Store(folder / "sync.db", _SCHEMA, synchronous="FULL")
        oplog.register(LOG_CONSUMER)
        self._root = rt.topics.root + "/"
        self.summaries = Summaries(self.store)
        self.streams = OffsetStreams(
            rt,
            self.store,
            {"ltm": _LtmSource(ltm), "log": self.summaries},
            part=PART,
            window=cfg.sync_window,
            batch=cfg.sync_batch,
            resend_s=cfg.sync_resend_s,
            link_topic=None,  # the uplink service is on the same broker; it waits for the link
            afresh=ltm.tracking_started,
            hop=outbox_hop(rt.topics, PART),
        )
        rt.every(cfg.summary_s, self.summarize)

    @property
    def epoch(self) -> str:
        return self.streams.epoch

    def summarize(self) -> None:
        """Summarise the log entries since the last summary into one ``log`` record."""
        done = max(self.summaries.summarized(), self.oplog.position(LOG_CONSUMER))
        upto = self.oplog.last_offset
        if upto <= done:
            return
        doc = self.oplog.summary(done, upto)
        by_topic: dict[str, int] = doc["by_topic"]  # type: ignore[assignment]
        doc["by_topic"] = {t.removeprefix(self._root): n for t, n in by_topic.items()}
        self.summaries.add(upto, orjson.dumps(doc))
        self.oplog.ack(LOG_CONSUMER, upto)  # after the summary is stored: a crash between redoes nothing
        self.metrics.counters["sync_summaries"] += 1
        self.pump_soon()

    def pump_soon(self) -> None:
        """Send what long-term memory or the log's summaries recorded since: the memory service calls
        it after each request and eviction (the streams do not poll for new records)."""
        self.streams.pump_soon()

    def compact(self) -> None:
        """Records the cloud has not taken within ``memory.retention_s`` go (counted and logged): a
        site whose uplink stays down keeps a bounded backlog, like its log."""
        self.streams.expire(self.cfg.retention_s)

    def status(self) -> dict[str, Any]:
        """What the service's metrics state shows: the link (``uplink_up``), per stream the backlog
        not yet in the cloud and its age (``uplink``), and the acknowledged offsets (``sync_*``)."""
        return self.streams.status()

    def close(self) -> None:
        self.streams.close()  # what it was at the stop, still readable after
        self.store.close()


def sync_on(settings: OutpostSettings) -> bool:
    """``memory.sync`` with ``auto`` resolved: a site without an uplink keeps nothing for a cloud."""
    return settings.memory.sync == "auto" and bool(settings.uplink.cloud)


def start_sync(
    rt: ServiceRuntime, settings: OutpostSettings, oplog: OpLog, ltm: LongTermMemory, folder: Path
) -> MemorySync | None:
    """The sync of this memory, or None when it is off."""
    if not sync_on(settings):
        return None
    return MemorySync(rt, settings, oplog, ltm, folder)
