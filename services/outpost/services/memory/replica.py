"""Memory sync, the cloud's side: a replica of every site's long-term memory and log summaries.

It runs beside the cloud broker (``outpost memory replica``), subscribes to ``up/memory/+`` of every
site of the installation (QoS 1, persistent session), and for each message of a site's stream
applies, in one transaction, the records that follow the last one it holds (``prev`` must match: a
gap means a message was lost on the way, and everything after it waits for the site to resend),
skips those it already holds (a replay is harmless), and then answers on that site's
``down/memory/ack`` with the last offset it has stored, always, so the site can forget what is safe
in the cloud and resend what is not. A message that goes on from a history the replica does not
hold (a new sync state of the site must start from offset 0) is answered ``unknown``: the site then
sends that stream again from its start. The protocol is :mod:`outpost.streams`' (its receiving
side); what is memory's here is what a record does (an item added or removed, a log summary).

Its state, in the cloud side's database (``outpost cloud run --db URL``: PostgreSQL or SQLite, beside
the uplink's records; ``outpost memory replica``: ``{data_dir}/replica.db``): per site and stream the
last offset, the long-term memory items (vector included), and the log summaries. A message that
is not a valid sync message is dead-lettered on the replica's own ``dlq/replica``.
"""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from outpost.clouddb import CloudDb, Db, sqlite_url
from outpost.contracts import StreamBatch, model_contract
from outpost.log import get_logger
from outpost.service import ServiceRuntime, run_until, service_main
from outpost.services.memory.sync import PART
from outpost.services.registry import OutpostSettings
from outpost.streams import Applied, receive_streams, start_receiving

__all__ = ["Applied", "CloudReplica", "ReplicaStore", "SyncMessage", "main", "run"]

NAME = "replica"
log = get_logger("outpost.memory.replica")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

REPLICA_FILE = "replica.db"
"""``outpost memory replica``'s database in its data folder (``outpost cloud run`` uses its ``--db``)."""

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

Segment = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


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


class SyncMessage(StreamBatch):
    """A :class:`~outpost.contracts.StreamBatch` of one of memory's two streams."""

    stream: Literal["ltm", "log"]


SYNC_MESSAGE = model_contract(SyncMessage)


class ReplicaStore(CloudDb):
    """The replica in the cloud side's database (:class:`~outpost.clouddb.CloudDb`: the URL of
    ``outpost cloud run --db``, or ``sqlite:///{data_dir}/replica.db`` for ``outpost memory
    replica``); :meth:`apply` is the whole protocol. ``readonly``: for what only looks (``outpost
    memory cloud``, ``outpost cloud status``): nothing is created or written."""

    def __init__(self, url: str, *, readonly: bool = False) -> None:
        # a record is written as it is applied (an add replaces, a removal deletes): a savepoint
        # each, so that one the database refuses is undone alone (memory sync is not a hot path)
        super().__init__(
            url,
            SCHEMA,
            tables=("items", "summaries"),
            what="a memory replica",
            readonly=readonly,
            savepoints=True,
        )

    def last(self, site: str, stream: str) -> int:
        return self.streams.last(site, stream)

    def apply(self, m: SyncMessage) -> Applied:
        """Apply what follows the last record held, in one transaction (:meth:`CloudDb.receive`):
        a bad record is refused alone, offsets that do not grow refuse the whole message."""
        return self.receive(m, self._apply_one, reset=self._reset)

    def _reset(self, db: Db, m: StreamBatch) -> None:
        if m.stream == "ltm":  # a new sync state of the site: its memory comes again, whole
            db.execute(self.q("DELETE FROM items WHERE site = ?"), (m.site,))

    def _apply_one(self, db: Db, m: StreamBatch, offset: int, body: dict[str, Any]) -> None:
        site = m.site
        if m.stream == "log":
            s = _Summary.model_validate(body)
            db.execute(
                self.q(
                    'INSERT INTO summaries (site, epoch, "offset", from_offset, to_offset, entries, doc) '
                    'VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (site, epoch, "offset") DO UPDATE SET '
                    "from_offset = excluded.from_offset, to_offset = excluded.to_offset, "
                    "entries = excluded.entries, doc = excluded.doc"
                ),
                (site, m.epoch, offset, s.from_offset, s.to_offset, s.entries, orjson.dumps(body).decode()),
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


class CloudReplica:
    """Runs on its kit's network thread; ``store`` defaults to ``{data_dir}/replica.db`` (SQLite)."""

    def __init__(self, settings: OutpostSettings, store: ReplicaStore | None = None) -> None:
        self.settings = settings
        self.rt = ServiceRuntime(
            NAME, settings, reasons=("bad_sync", "bad_record"), durable=True, mqtt5=False
        )
        self.bus = self.rt.bus
        self.metrics = self.rt.metrics
        self.topics = settings.topics
        self.store = (
            store if store is not None else ReplicaStore(sqlite_url(Path(settings.data_dir) / REPLICA_FILE))
        )
        receive_streams(
            self.rt, PART, SYNC_MESSAGE, self.store.apply, bad="bad_sync", max_bytes=MAX_MESSAGE_BYTES
        )

    def start(self) -> None:
        start_receiving(self.rt, "the memory replica", self.store.url_kind)

    def stop(self) -> None:
        self.rt.stop()
        self.store.close()


def run(settings: OutpostSettings, stop: threading.Event) -> CloudReplica:
    return run_until(CloudReplica(settings), stop)


def main() -> None:
    service_main(CloudReplica, OutpostSettings)
