"""The cloud side's storage: every site's uplink records, in PostgreSQL (many sites) or SQLite (one
site, a test bench), with the receiver's ledger of :mod:`outpost.streams` beside them.

``records`` holds each record once per (site, stream, id): a record sent again (a site that took
it twice after a kill, a replay) is recognised by its id and dropped. Device and seq are kept
where the record has them (events), so per-device order can be checked in SQL; ``offset`` is the
site's offset of the record in its stream (its order of arrival at the site).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import replace
from typing import Any, cast

import orjson
import psycopg
from pydantic import BaseModel, ConfigDict, Field

from outpost.clouddb import CloudDb, Db, RelaySink
from outpost.contracts import StreamBatch
from outpost.services.uplink.outbox import STREAMS
from outpost.services.uplink.relay import PART as RELAYED
from outpost.services.uplink.relay import Relayed
from outpost.streams import Applied
from outpost.topics import SEGMENT_RE

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS records (
    site TEXT NOT NULL,
    stream TEXT NOT NULL,
    id TEXT NOT NULL,
    epoch TEXT NOT NULL,
    "offset" BIGINT NOT NULL,
    topic TEXT NOT NULL,
    device TEXT,
    seq BIGINT,
    body TEXT NOT NULL,
    received_ns BIGINT NOT NULL,
    UNIQUE (site, stream, id)
)""",
    'CREATE INDEX IF NOT EXISTS records_order ON records (site, stream, "offset")',
    """CREATE TABLE IF NOT EXISTS lag (
    site TEXT NOT NULL,
    stream TEXT NOT NULL,
    behind BIGINT NOT NULL,
    PRIMARY KEY (site, stream)
)""",
)


class Record(BaseModel):
    """One record as the site's uplink sends it: the topic it came on (below the site's root) and
    the producer's message."""

    model_config = ConfigDict(extra="forbid", strict=True)
    topic: str = Field(min_length=1, max_length=300)
    body: dict[str, Any]


def _device(body: dict[str, Any]) -> str | None:
    d = body.get("device")
    return d if isinstance(d, str) and SEGMENT_RE.fullmatch(d) else None


def _seq(body: dict[str, Any]) -> int | None:
    s = body.get("seq")
    return s if isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 else None


class CloudStore(CloudDb):
    """The uplink's records in the cloud side's database (:class:`~outpost.clouddb.CloudDb`:
    ``postgresql://...`` or ``sqlite:///PATH``). ``readonly``: for what only looks (``outpost cloud
    status``): nothing is created or written. ``relay``: where the ``memory`` stream's records
    (:class:`~.relay.Relayed`) are applied; without one they are refused."""

    def __init__(self, url: str, *, readonly: bool = False, relay: RelaySink | None = None) -> None:
        super().__init__(url, SCHEMA, tables=("records", "lag"), what="the uplink", readonly=readonly)
        self.relay = relay

    def apply(self, m: StreamBatch) -> Applied:
        """Apply a message's records that follow the last one held, in one transaction; also how
        many were already held by id (sent twice by the site: ``same_id``). Each record is checked, then all
        are written in one bulk insert (psycopg pipelines it: one round trip, not three a record)."""
        rows: list[tuple[Any, ...]] = []
        relayed: list[tuple[int, Relayed]] = []
        refused: list[tuple[int, str]] = []
        now = time.time_ns()

        def one(_db: Db, m: StreamBatch, offset: int, body: dict[str, Any]) -> None:
            r = Record.model_validate(body)
            if m.stream == RELAYED:
                if self.relay is None:
                    raise ValueError("this cloud side keeps no memory replica")
                # JSON mode: strict, with the records' pairs as the arrays they are on the wire
                relayed.append((offset, Relayed.model_validate_json(orjson.dumps(r.body))))
                return
            rid = r.body.get("id")
            if not isinstance(rid, str) or not 0 < len(rid) <= 128:
                raise ValueError(f"record {offset} has no string id of 1-128 characters")
            doc = orjson.dumps(r.body).decode()
            rows.append(
                (m.site, m.stream, rid, m.epoch, offset, r.topic, _device(r.body), _seq(r.body), doc, now)
            )

        inserted = [0]

        def finish(db: Db) -> None:
            if rows:
                inserted[0] = self._insert(db, rows)
            for offset, r in relayed:
                assert self.relay is not None
                for o, why in self.relay(db, m.site, r.stream, r.epoch, r.start, r.records):
                    refused.append((offset, f"{RELAYED} {r.stream} record {o}: {why}"))
            # only a message that brought something new says where the site stands (a replay of old
            # records would say it was further behind than it is)
            if (rows or relayed) and m.behind is not None:
                db.execute(
                    self.q(
                        "INSERT INTO lag (site, stream, behind) VALUES (?, ?, ?) "
                        "ON CONFLICT (site, stream) DO UPDATE SET behind = excluded.behind"
                    ),
                    (m.site, m.stream, m.behind),
                )

        done = self.receive(m, one, finish=finish)
        return replace(done, same_id=len(rows) - inserted[0], rejected=done.rejected + refused)

    def _insert(self, db: Db, rows: list[tuple[Any, ...]]) -> int:
        """Insert, skipping ids held already; how many were new."""
        sql = self.q(
            'INSERT INTO records (site, stream, id, epoch, "offset", topic, device, seq, body, received_ns) '
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (site, stream, id) DO NOTHING"
        )
        if isinstance(db, sqlite3.Connection):
            return db.executemany(sql, rows).rowcount
        with cast("psycopg.Connection[Any]", db).cursor() as cur:
            cur.executemany(sql, rows)
            return cur.rowcount

    # --- what the cloud reads -----------------------------------------------------------------------
    def records(self, site: str, stream: str) -> list[dict[str, Any]]:
        """A site's records of a stream, in the site's order: offset, id, topic, device, seq, body."""
        rows = self.db.execute(
            self.q(
                'SELECT "offset", id, topic, device, seq, body FROM records WHERE site = ? AND stream = ? '
                'ORDER BY "offset"'
            ),
            (site, stream),
        ).fetchall()
        return [
            {"offset": int(o), "id": i, "topic": t, "device": d, "seq": s, "body": orjson.loads(b)}
            for o, i, t, d, s, b in rows
        ]

    def overview(self) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
        """Per site, per stream: the acknowledged offset (``acked``), the records held, when the
        last arrived (``last_ns``, wall ns) and the time since (``since_s``), and the lag the site
        reported with its last message (``behind``: records it held past it; None if never said).
        The ``memory`` stream's records are held in the replica, not here: None."""
        now = time.time_ns()
        sites: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        for site, stream, last in self.db.execute(
            "SELECT site, stream, last FROM streams ORDER BY site, stream"
        ).fetchall():
            if stream not in STREAMS:  # another receiver's (memory sync's) in the same ledger
                continue
            sites.setdefault(site, {"streams": {}})["streams"][stream] = {
                "acked": int(last),
                "records": None if stream == RELAYED else 0,
                "last_ns": None,
                "since_s": None,
                "behind": None,
            }
        for site, stream, n, last_ns in self.db.execute(
            "SELECT site, stream, count(*), max(received_ns) FROM records GROUP BY site, stream"
        ).fetchall():
            d = sites.setdefault(site, {"streams": {}})["streams"].setdefault(
                stream, {"acked": 0, "records": 0, "last_ns": None, "since_s": None, "behind": None}
            )
            d.update(records=int(n), last_ns=int(last_ns), since_s=round((now - int(last_ns)) / 1e9, 3))
        for site, stream, behind in self.db.execute("SELECT site, stream, behind FROM lag").fetchall():
            held = sites.get(site, {}).get("streams", {}).get(stream)
            if held is not None:
                held["behind"] = int(behind)
        return sites
