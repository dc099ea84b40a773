"""Memory sync, the cloud's side: a replica of every site's long-term memory and log summaries.

Memory's two streams reach the cloud through the uplink (:mod:`outpost.services.uplink.relay`):
the site's uplink service takes them into its outbox, and the cloud side (``outpost cloud run``)
hands each relayed record, in the same transaction as the uplink's own ledger, to
:meth:`ReplicaStore.apply_relayed`. The uplink's protocol has already put the records in order,
once each; what is memory's here is the epoch (a relayed record that **starts** a stream, or one of
another epoch, drops what the replica held of the site's long-term memory: the whole memory comes
again), the offsets (a record at or below the last one held is a duplicate and skipped) and what a
record does (an item added or removed, a log summary).

Its state, in the cloud side's database (``outpost cloud run --db URL``: PostgreSQL or SQLite,
beside the uplink's records): per site and stream the last offset and its epoch (the receivers'
ledger), the long-term memory items (vector included), and the log summaries.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from outpost.clouddb import CloudDb, Db, RelaySink
from outpost.contracts import Segment
from outpost.streams import Records

STREAMS = ("ltm", "log")
"""Memory sync's streams (:mod:`.sync`)."""

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS items (
    site TEXT NOT NULL,
    key BIGINT NOT NULL,
    namespace TEXT NOT NULL,
    subject TEXT NOT NULL,
    meta TEXT NOT NULL,
    payload TEXT NOT NULL,
    vector {blob} NOT NULL,
    created_ns BIGINT NOT NULL,
    expires_ns BIGINT,
    PRIMARY KEY (site, key)
)""",
    """CREATE TABLE IF NOT EXISTS summaries (
    site TEXT NOT NULL,
    epoch TEXT NOT NULL,
    "offset" BIGINT NOT NULL,
    from_offset BIGINT NOT NULL,
    to_offset BIGINT NOT NULL,
    entries BIGINT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (site, epoch, "offset")
)""",
)
"""The replica's tables, beside the receivers' ledger in the cloud side's database."""


class _Add(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    op: Literal["add"]
    key: int = Field(ge=1)
    namespace: Segment
    subject: str = Field(max_length=128)
    meta: dict[str, str | int | float | bool]
    payload: Any
    vector: str = Field(max_length=64 * 1024)
    created_ns: int = Field(ge=0)
    expires_ns: int | None


class _Remove(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    op: Literal["del", "gone"]
    key: int = Field(ge=1)


class _Summary(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    from_offset: int = Field(ge=0)
    to_offset: int = Field(ge=0)
    entries: int = Field(ge=0)


class ReplicaStore(CloudDb):
    """The replica in the cloud side's database (:class:`~outpost.clouddb.CloudDb`: the URL of
    ``outpost cloud run --db``); :meth:`apply_relayed` is what the cloud side calls. ``readonly``:
    for what only looks (``outpost memory cloud``, ``outpost cloud status``): nothing is created or
    written."""

    def __init__(self, url: str, *, readonly: bool = False) -> None:
        super().__init__(
            url, SCHEMA, tables=("items", "summaries"), what="a memory replica", readonly=readonly
        )

    def last(self, site: str, stream: str) -> int:
        return self.streams.last(site, stream)

    @classmethod
    def relay_into(cls, url: str) -> RelaySink:
        """The replica's tables made in the cloud side's database at ``url``, and what applies the
        relayed records to them (:meth:`apply_relayed`, on the cloud side's own connection: this
        store's is closed at once)."""
        store = cls(url)
        store.close()
        return store.apply_relayed

    def apply_relayed(
        self, db: Db, site: str, stream: str, epoch: str, start: bool, records: Records
    ) -> list[tuple[int, str]]:
        """Apply one relayed record of a site's memory stream on ``db`` (the cloud side's
        connection, in its transaction): drop the site's long-term memory first when it starts the
        stream or comes from another epoch, skip records at or below the last one held, apply the
        rest (each under a savepoint: one the replica refuses is undone alone). The records
        refused, (offset, why)."""
        if stream not in STREAMS:
            return [(records[0][0] if records else 0, f"not a stream of memory sync: {stream[:64]!r}")]
        row = db.execute(
            self.q("SELECT last, epoch FROM streams WHERE site = ? AND stream = ?"), (site, stream)
        ).fetchone()
        last = 0
        if start or row is None or row[1] != epoch:
            if stream == "ltm":  # the site's memory comes again, whole
                db.execute(self.q("DELETE FROM items WHERE site = ?"), (site,))
        else:
            last = int(row[0])
        refused: list[tuple[int, str]] = []
        for offset, body in records:
            if offset <= last:
                continue  # held already
            db.execute("SAVEPOINT record")
            try:
                self._apply_one(db, site, stream, epoch, offset, body)
                db.execute("RELEASE record")
            except (ValidationError, ValueError) as exc:
                db.execute("ROLLBACK TO record")
                db.execute("RELEASE record")
                refused.append((offset, str(exc)[:500]))
            last = offset
        db.execute(
            self.q(
                "INSERT INTO streams (site, stream, last, epoch) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(site, stream) DO UPDATE SET last = excluded.last, epoch = excluded.epoch"
            ),
            (site, stream, last, epoch),
        )
        return refused

    def _apply_one(
        self, db: Db, site: str, stream: str, epoch: str, offset: int, body: dict[str, Any]
    ) -> None:
        if stream == "log":
            s = _Summary.model_validate(body)
            db.execute(
                self.q(
                    'INSERT INTO summaries (site, epoch, "offset", from_offset, to_offset, entries, doc) '
                    'VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (site, epoch, "offset") DO UPDATE SET '
                    "from_offset = excluded.from_offset, to_offset = excluded.to_offset, "
                    "entries = excluded.entries, doc = excluded.doc"
                ),
                (site, epoch, offset, s.from_offset, s.to_offset, s.entries, orjson.dumps(body).decode()),
            )
            return
        if body.get("op") == "add":
            a = _Add.model_validate(body)
            try:
                vector = base64.b64decode(a.vector, validate=True)
            except ValueError as exc:
                raise ValueError(f"record {offset}: the vector is not base64: {exc}") from None
            if not vector or len(vector) % 4:
                raise ValueError(f"record {offset}: the vector is not float32 bytes")
            db.execute(
                self.q(
                    "INSERT INTO items (site, key, namespace, subject, meta, payload, vector, created_ns, "
                    "expires_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (site, key) DO UPDATE SET "
                    "namespace = excluded.namespace, subject = excluded.subject, meta = excluded.meta, "
                    "payload = excluded.payload, vector = excluded.vector, "
                    "created_ns = excluded.created_ns, expires_ns = excluded.expires_ns"
                ),
                (
                    site,
                    a.key,
                    a.namespace,
                    a.subject,
                    orjson.dumps(a.meta).decode(),
                    orjson.dumps(a.payload).decode(),
                    vector,
                    a.created_ns,
                    a.expires_ns,
                ),
            )
        else:
            r = _Remove.model_validate(body)
            if r.op == "del":
                db.execute(self.q("DELETE FROM items WHERE site = ? AND key = ?"), (site, r.key))

    # --- what the cloud reads ---------------------------------------------------------------------
    def items(self, site: str) -> dict[int, dict[str, Any]]:
        rows = self.db.execute(
            self.q("SELECT key, namespace, subject, meta, payload FROM items WHERE site = ? ORDER BY key"),
            (site,),
        ).fetchall()
        return {
            int(k): {"namespace": ns, "subject": sub, "meta": orjson.loads(meta), "payload": orjson.loads(p)}
            for k, ns, sub, meta, p in rows
        }

    def summaries(self, site: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            self.q(
                "SELECT doc FROM summaries s WHERE site = ? AND epoch = (SELECT epoch FROM streams "
                "WHERE site = s.site AND stream = 'log') ORDER BY \"offset\""
            ),
            (site,),
        ).fetchall()
        return [orjson.loads(d) for (d,) in rows]

    def overview(self) -> dict[str, dict[str, int]]:
        """Per site: items held, log summaries, log entries they cover, last offset per stream."""
        out: dict[str, dict[str, int]] = {}

        def of(site: str) -> dict[str, int]:
            return out.setdefault(
                site, {"items": 0, "summaries": 0, "entries": 0, "ltm_offset": 0, "log_offset": 0}
            )

        for site, stream, last in self.db.execute(
            "SELECT site, stream, last FROM streams WHERE stream IN ('ltm', 'log') ORDER BY site"
        ).fetchall():
            of(site)[f"{stream}_offset"] = int(last)
        for site, n in self.db.execute("SELECT site, count(*) FROM items GROUP BY site").fetchall():
            of(site)["items"] = int(n)
        for site, n, entries in self.db.execute(
            "SELECT site, count(*), sum(entries) FROM summaries GROUP BY site"
        ).fetchall():
            of(site)["summaries"], of(site)["entries"] = int(n), int(entries or 0)
        return out
