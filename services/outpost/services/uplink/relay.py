"""A part's offset streams taken into the uplink's outbox: memory sync goes to the cloud through
the uplink service, under its priorities, byte cap, disk budget and status (docs/uplink.md,
"Memory sync through the uplink").

The memory service keeps its two streams (``ltm``, ``log``; :mod:`outpost.services.memory.sync`)
and hands them to the uplink service on the site's own broker, ``outbox/memory/{stream}``
(:func:`outpost.streams.outbox_hop`, never bridged). Here each message is applied with the
receiving side of :mod:`outpost.streams` on the outbox's database: the records that follow the last
one held become **one** record of the outbox's ``memory`` stream (a :class:`Relayed`), written in
the same transaction as the ledger, and only then is memory told how far the outbox holds its
stream (``outbox/memory/{stream}/ack``), upon which memory forgets those records. The uplink sends
them on with its other streams; the cloud side applies each :class:`Relayed` to the replica.

A relayed record says memory's epoch and whether it **starts** the stream here: the first of a new
epoch (a wiped gateway, sync turned back on), or the first after the outbox forgot the stream. The
replica then drops what it held of the site's long-term memory and takes it anew.

While the outbox is over its disk budget it takes nothing of memory's (memory's messages are left
unanswered and memory keeps its records, bounded there by ``memory.retention_s``): the budget cuts
other streams, never this one, which must arrive whole.

The outbox forgets memory's streams when it loses memory records: past ``uplink.max_age_s``, or
when the cloud side lost its state and asks for the stream again. It then
drops the memory records it still holds and tells memory (an ``unknown`` acknowledgement): memory
queues its whole long-term memory again, which reaches the replica as a start, so the replica ends
up holding exactly the site's memory again, removals included. (Log summaries the cloud never got
cannot be made again: they are lost, counted as dropped or expired.)
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from outpost.contracts import Segment, StreamBatch, encode, model_contract
from outpost.log import get_logger
from outpost.service import ServiceRuntime
from outpost.services.uplink.outbox import Added, Outbox, Taken
from outpost.store import DiskFull
from outpost.streams import Applied, ReceivedStreams, StoreUnavailableError, outbox_hop, receive_streams

log = get_logger("outpost.services.uplink.relay")

PART = "memory"
"""The part whose streams are relayed, and the outbox stream they go in."""

REASONS = ("bad_sync",)
"""A message on ``outbox/memory/+`` that is not a valid stream message of this site."""

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Memory's messages carry ``memory.sync_batch`` items with their vectors: more than an event."""


class Relayed(BaseModel):
    """One record of the outbox's ``memory`` stream: the records of one of memory's messages that
    were new to the outbox, with memory's stream and epoch, and whether they start the stream."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(min_length=1, max_length=128)
    stream: Segment
    epoch: str = Field(min_length=1, max_length=64)
    start: bool
    records: list[tuple[int, dict[str, Any]]] = Field(min_length=1)


class Relay:
    """Runs on the uplink service's network thread, on the outbox's connection."""

    def __init__(self, rt: ServiceRuntime, outbox: Outbox, *, budget: int, after: Callable[[], None]) -> None:
        """``budget``: the outbox's disk budget in bytes; over it nothing is taken. ``after``: called
        once memory's records are committed (the uplink keeps the budget, pumps)."""
        self.rt = rt
        self.outbox = outbox
        self.budget = budget
        self.after = after
        self.site = rt.topics.site
        self.received: ReceivedStreams[sqlite3.Connection] = ReceivedStreams(
            outbox.store.db, savepoints=False
        )
        self.hop = outbox_hop(rt.topics, PART)
        receive_streams(
            rt,
            PART,
            model_contract(StreamBatch),
            self.apply,
            bad="bad_sync",
            max_bytes=MAX_MESSAGE_BYTES,
            hop=self.hop,
        )

    def _held(self) -> dict[str, tuple[int, str]]:
        """Per stream of memory's: the last offset the outbox holds and its epoch."""
        rows = self.outbox.store.query("SELECT stream, last, epoch FROM streams WHERE site = ?", (self.site,))
        return {str(s): (int(last), str(e)) for s, last, e in rows}

    def apply(self, m: StreamBatch) -> Applied:
        if self.outbox.bytes > self.budget:
            # left unanswered: memory keeps its records and sends them again (bounded there by
            # memory.retention_s); cutting this stream to make room would leave the replica short
            self.rt.metrics.counters["relay_waits"] += 1
            raise StoreUnavailableError("the outbox is over its disk budget: memory sync waits for room")
        held = self._held().get(m.stream)
        start = held is None or held[1] != m.epoch or held[0] == 0
        taken: list[tuple[int, dict[str, Any]]] = []
        added: list[Added] = []

        def one(_db: sqlite3.Connection, _m: StreamBatch, offset: int, body: dict[str, Any]) -> None:
            taken.append((offset, body))

        def finish(db: sqlite3.Connection) -> None:
            if not taken:
                return
            doc = {
                "id": f"{m.epoch[:32]}-{m.stream}-{taken[0][0]}-{taken[-1][0]}",
                "stream": m.stream,
                "epoch": m.epoch,
                "start": start,
                "records": taken,
            }
            topic = f"outbox/{PART}/{m.stream}"
            added.append(self.outbox.write(db, [Taken(PART, topic, orjson.dumps(doc), time.time_ns())]))

        try:
            done = self.received.apply(m, one, finish=finish)
        except (sqlite3.Error, OSError, DiskFull) as exc:
            raise StoreUnavailableError(f"the outbox cannot take memory's records: {exc}") from None
        for a in added:
            self.outbox.took(a)
            self.rt.metrics.counters[f"uplink_taken.{PART}"] += a.count
            self.after()
        return done

    def forget(self, why: str) -> None:
        """The outbox lost memory records: drop the rest and have memory send its streams again
        from their start (an ``unknown`` acknowledgement for the epoch it holds)."""
        held = self._held()
        if not held and not self.outbox.last(PART):
            return  # nothing was ever taken (a new outbox's first epoch)
        self.outbox.store.db.execute("DELETE FROM streams WHERE site = ?", (self.site,))
        dropped = self.outbox.trim(PART, self.outbox.last(PART))
        for stream, (_last, epoch) in held.items():
            self.rt.publish(
                self.hop.ack_to(self.site, stream),
                encode("", stream=stream, offset=0, epoch=epoch, unknown=True),
            )
        self.rt.metrics.counters["relay_forgotten"] += 1
        log.warning(
            "memory's streams forgotten: memory sends them again from their start",
            extra={"why": why, "streams": sorted(held), "records_dropped": dropped},
        )
