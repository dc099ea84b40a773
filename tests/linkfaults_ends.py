"""The two small ends the link-fault harness (:mod:`tests.linkfaults`) runs when it proves itself
without the uplink service and the cloud side: real processes, each on the core's offset streams.

``python -m tests.linkfaults_ends sender DB STREAMS WINDOW BATCH RESEND_S``: on the edge broker, it
sends the records of the durable source in ``DB`` (SQLite, filled by :class:`SourceFeed` from another
process) with :class:`outpost.streams.OffsetStreams`, following the bridge's link state, and
forgets what the receiver acknowledged.

``python -m tests.linkfaults_ends receiver DB``: on the cloud broker, it applies every stream of
every site with :class:`outpost.streams.ReceivedStreams` into ``DB`` (table ``received``, one row per
record applied, in the order applied) and tallies, per message, the copies it was given, those it
applied, the duplicates it recognised and those a gap made it leave for a resend. The tally is
committed just after the records, in a transaction of its own (``ReceivedStreams.apply`` holds
one): a kill -9 between the two loses one message's tally, never a record.

Both take the site, the prefix and the broker from ``OUTPOST_*`` as every service does.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outpost.contracts import STREAM_BATCH, StreamBatch
from outpost.log import setup_logging
from outpost.service import Ack, Inbound, Rejected, ServiceRuntime, install_stop_signals, wait
from outpost.settings import CoreSettings, load_settings
from outpost.store import Store, transaction
from outpost.streams import RECEIVER_SCHEMA, SENDER_SCHEMA, OffsetStreams, ReceivedStreams, Records, answer
from outpost.topics import Topics

PART = "faults"
"""The ``up/{part}/{stream}`` part of the test streams (``down/faults/ack`` for the answers)."""

SOURCE_SCHEMA = (
    SENDER_SCHEMA
    + """
CREATE TABLE IF NOT EXISTS records (
    stream TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    made_ns INTEGER NOT NULL,
    PRIMARY KEY (stream, "offset")
);
CREATE TABLE IF NOT EXISTS heads (
    stream TEXT PRIMARY KEY,
    "last" INTEGER NOT NULL
);
"""
)
"""The sender's database: its own state, the records not yet acknowledged, and per stream the last
offset handed out (kept apart from the records, which go once acknowledged)."""

RECEIVED_SCHEMA = (
    RECEIVER_SCHEMA
    + """
CREATE TABLE IF NOT EXISTS received (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    site TEXT NOT NULL,
    stream TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    device TEXT NOT NULL,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tally (
    key TEXT PRIMARY KEY,
    n INTEGER NOT NULL
);
"""
)
"""The receiver's database. ``received`` has no unique key on purpose: a record applied twice would
show as two rows."""


@dataclass
class SourceTable:
    """One stream of the sender's durable source (:class:`outpost.streams.Source`)."""

    store: Store
    stream: str

    def after(self, offset: int, limit: int) -> Records:
        rows = self.store.query(
            'SELECT "offset", device, seq FROM records WHERE stream = ? AND "offset" > ? '
            'ORDER BY "offset" LIMIT ?',
            (self.stream, offset, limit),
        )
        return [(int(o), {"device": d, "seq": int(s)}) for o, d, s in rows]

    def trim(self, upto: int) -> None:
        self.store.db.execute('DELETE FROM records WHERE stream = ? AND "offset" <= ?', (self.stream, upto))

    def last(self) -> int:
        row = self.store.one('SELECT "last" FROM heads WHERE stream = ?', (self.stream,))
        return int(row[0]) if row else 0

    def expire(self, before_ns: int) -> int:
        return 0  # the fault tests lose nothing on purpose

    def snapshot(self) -> int:
        return 0  # what was acknowledged and forgotten cannot be made again

    def pending(self, after: int) -> tuple[int, int | None]:
        n, oldest = self.store.query(
            'SELECT COUNT(*), MIN(made_ns) FROM records WHERE stream = ? AND "offset" > ?',
            (self.stream, after),
        )[0]
        return int(n), None if oldest is None else int(oldest)


class SourceFeed:
    """The producer of the test sender: appends records to its source, durably, from the test."""

    def __init__(self, path: Path) -> None:
        self.store = Store(path, SOURCE_SCHEMA)

    def put(self, records: list[tuple[str, str, int]]) -> None:
        """(stream, device, seq) records, in one transaction, each stream's offsets following on."""
        now = time.time_ns()
        with transaction(self.store.db) as db:
            for stream, device, seq in records:
                row = db.execute('SELECT "last" FROM heads WHERE stream = ?', (stream,)).fetchone()
                offset = (int(row[0]) if row else 0) + 1
                db.execute(
                    'INSERT INTO records (stream, "offset", device, seq, made_ns) VALUES (?, ?, ?, ?, ?)',
                    (stream, offset, device, seq, now),
                )
                db.execute('INSERT OR REPLACE INTO heads (stream, "last") VALUES (?, ?)', (stream, offset))

    def close(self) -> None:
        self.store.close()


def run_sender(settings: CoreSettings, stop: threading.Event, argv: list[str]) -> None:
    db, streams, window, batch, resend_s = Path(argv[0]), argv[1].split(","), *argv[2:5]
    rt = ServiceRuntime("lfsender", settings, mqtt5=False, reasons=("bad_ack",))
    store = Store(db, SOURCE_SCHEMA)
    OffsetStreams(
        rt,
        store,
        {name: SourceTable(store, name) for name in streams},
        part=PART,
        window=int(window),
        batch=int(batch),
        resend_s=float(resend_s),
        link_topic=rt.topics.uplink_state(),
        counter_prefix="faults",
    )
    rt.start(wait_s=None)
    wait(stop, 0.1)
    rt.stop()
    store.close()


class Receiver:
    """Applies every site's test streams into its database and answers each message."""

    def __init__(self, settings: CoreSettings, db: Path) -> None:
        self.rt = ServiceRuntime("lfreceiver", settings, durable=True, mqtt5=False, reasons=("bad_batch",))
        self.prefix = settings.prefix
        self.store = Store(db, RECEIVED_SCHEMA)
        self.streams = ReceivedStreams(self.store.db)
        # committed before the handler returns; acknowledged once its answer is on the broker, so a
        # kill -9 between the two has the broker redeliver it (recognised as duplicates)
        self.rt.subscribe(
            settings.topics.every_site_up(PART),
            self._on_batch,
            contract=STREAM_BATCH,
            ack=Ack.AFTER_OUTPUTS,
            invalid_reason="bad_batch",
        )

    def _on_batch(self, inbound: Inbound[StreamBatch]) -> None:
        m = inbound.items[0][1]
        try:
            done = self.streams.apply(m, self._apply_one)
        except ValueError as exc:
            raise Rejected("bad_batch", str(exc)[:500]) from None
        left = len(m.records) - done.applied - done.duplicates - len(done.rejected)
        with transaction(self.store.db) as db:
            for key, n in (
                ("copies", len(m.records)),
                ("applied", done.applied),
                ("duplicates", done.duplicates),
                ("after_gap", left),
                ("unknown", int(done.unknown)),
            ):
                db.execute(
                    "INSERT INTO tally (key, n) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET n = n + excluded.n",
                    (key, n),
                )
        to = Topics(site=m.site, prefix=self.prefix).down(PART, "ack")
        self.rt.publish(to, answer(m, done), for_=inbound.turn)

    @staticmethod
    def _apply_one(db: sqlite3.Connection, m: StreamBatch, offset: int, body: dict[str, Any]) -> None:
        db.execute(
            'INSERT INTO received (site, stream, "offset", device, seq) VALUES (?, ?, ?, ?, ?)',
            (m.site, m.stream, offset, str(body["device"]), int(body["seq"])),
        )


def run_receiver(settings: CoreSettings, stop: threading.Event, argv: list[str]) -> None:
    r = Receiver(settings, Path(argv[0]))
    r.rt.start(wait_s=None)
    wait(stop, 0.1)
    r.rt.stop()
    r.store.close()


def main() -> None:
    role, *argv = sys.argv[1:]
    settings = load_settings(CoreSettings)
    setup_logging(settings.log_level, json=settings.log_json)
    stop = threading.Event()
    install_stop_signals(stop)
    {"sender": run_sender, "receiver": run_receiver}[role](settings, stop, argv)


if __name__ == "__main__":
    main()
