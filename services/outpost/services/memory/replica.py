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

Its state (``{data_dir}/replica.db``): per site and stream the last offset, the long-term memory
items (vector included), and the log summaries. A message that is not a valid sync message is
dead-lettered on the replica's own ``dlq/replica``.
"""

from __future__ import annotations

import base64
import sqlite3
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from outpost.contracts import StreamBatch, model_contract
from outpost.errors import OutpostError
from outpost.log import get_logger
from outpost.service import ServiceRuntime, run_until, service_main
from outpost.services.memory.sync import PART
from outpost.services.registry import OutpostSettings
from outpost.store import Store
from outpost.streams import RECEIVER_SCHEMA, Applied, ReceivedStreams, receive_streams

__all__ = ["Applied", "CloudReplica", "ReplicaError", "ReplicaStore", "SyncMessage", "main", "run"]

NAME = "replica"
log = get_logger("outpost.memory.replica")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_SCHEMA = (
    RECEIVER_SCHEMA
    + """
CREATE TABLE IF NOT EXISTS items (
    site TEXT NOT NULL,
    key INTEGER NOT NULL,
    namespace TEXT NOT NULL,
    subject TEXT NOT NULL,
    meta BLOB NOT NULL,
    payload BLOB NOT NULL,
    vector BLOB NOT NULL,
    created_ns INTEGER NOT NULL,
    expires_ns INTEGER,
    PRIMARY KEY (site, key)
);
CREATE TABLE IF NOT EXISTS summaries (
    site TEXT NOT NULL,
    epoch TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    from_offset INTEGER NOT NULL,
    to_offset INTEGER NOT NULL,
    entries INTEGER NOT NULL,
    doc BLOB NOT NULL,
    PRIMARY KEY (site, epoch, "offset")
);
"""
)

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


class ReplicaError(OutpostError):
    """The replica's database cannot be used."""


class ReplicaStore:
    """The replica's SQLite state; :meth:`apply` is the whole protocol."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        """``readonly``: for what only looks (``outpost memory cloud``): the file must already be a
        replica's, and nothing is written to it."""
        self.path = path
        self.store: Store | None = None
        try:
            if readonly:
                self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
                tables = {
                    r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                }
                if not {"streams", "items", "summaries"} <= tables:
                    self.db.close()
                    raise ReplicaError(f"{path} is not a memory replica's database")
            else:
                self.store = Store(path, _SCHEMA, synchronous="FULL")
                self.db = self.store.db
        except sqlite3.DatabaseError as exc:
            raise ReplicaError(f"replica state {path} cannot be used ({exc})") from None
        self.streams = ReceivedStreams(self.db)

    def last(self, site: str, stream: str) -> int:
        return self.streams.last(site, stream)

    def apply(self, m: SyncMessage) -> Applied:
        """Apply what follows the last record held, in one transaction (:meth:`ReceivedStreams.apply`):
        a bad record is refused alone, offsets that do not grow refuse the whole message."""
        return self.streams.apply(m, self._apply_one, reset=self._reset)

    @staticmethod
    def _reset(db: sqlite3.Connection, m: StreamBatch) -> None:
        if m.stream == "ltm":  # a new sync state of the site: its memory comes again, whole
            db.execute("DELETE FROM items WHERE site = ?", (m.site,))

    @staticmethod
    def _apply_one(db: sqlite3.Connection, m: StreamBatch, offset: int, body: dict[str, Any]) -> None:
        site = m.site
        if m.stream == "log":
            s = _Summary.model_validate(body)
            db.execute(
                'INSERT OR REPLACE INTO summaries (site, epoch, "offset", from_offset, to_offset, entries, '
                "doc) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (site, m.epoch, offset, s.from_offset, s.to_offset, s.entries, orjson.dumps(body)),
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
                "INSERT OR REPLACE INTO items (site, key, namespace, subject, meta, payload, vector, "
                "created_ns, expires_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    site,
                    a.key,
                    a.namespace,
                    a.subject,
                    orjson.dumps(a.meta),
                    orjson.dumps(a.payload),
                    vector,
                    a.created_ns,
                    a.expires_ns,
                ),
            )
        else:
            r = _Remove.model_validate(body)
            if r.op == "del":
                db.execute("DELETE FROM items WHERE site = ? AND key = ?", (site, r.key))

    # --- what the cloud reads ---------------------------------------------------------------------
    def items(self, site: str) -> dict[int, dict[str, Any]]:
        rows = self.db.execute(
            "SELECT key, namespace, subject, meta, payload FROM items WHERE site = ? ORDER BY key", (site,)
        )
        return {
            int(k): {"namespace": ns, "subject": sub, "meta": orjson.loads(meta), "payload": orjson.loads(p)}
            for k, ns, sub, meta, p in rows
        }

    def summaries(self, site: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT doc FROM summaries s WHERE site = ? AND epoch = (SELECT epoch FROM streams "
            "WHERE site = s.site AND stream = 'log') ORDER BY \"offset\"",
            (site,),
        )
        return [orjson.loads(d) for (d,) in rows]

    def overview(self) -> dict[str, dict[str, int]]:
        """Per site: items held, log summaries, log entries they cover, last offset per stream."""
        out: dict[str, dict[str, int]] = {}
        for site, stream, last in self.db.execute("SELECT site, stream, last FROM streams ORDER BY site"):
            d = out.setdefault(
                site, {"items": 0, "summaries": 0, "entries": 0, "ltm_offset": 0, "log_offset": 0}
            )
            d[f"{stream}_offset"] = int(last)
        for site, n in self.db.execute("SELECT site, count(*) FROM items GROUP BY site"):
            out.setdefault(site, {"items": 0, "summaries": 0, "entries": 0, "ltm_offset": 0, "log_offset": 0})
            out[site]["items"] = int(n)
        for site, n, entries in self.db.execute(
            "SELECT site, count(*), sum(entries) FROM summaries GROUP BY site"
        ):
            out[site]["summaries"], out[site]["entries"] = int(n), int(entries or 0)
        return out

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        else:
            self.db.close()


class CloudReplica:
    def __init__(self, settings: OutpostSettings) -> None:
        self.settings = settings
        self.rt = ServiceRuntime(
            NAME, settings, reasons=("bad_sync", "bad_record"), durable=True, mqtt5=False
        )
        self.bus = self.rt.bus
        self.metrics = self.rt.metrics
        self.topics = settings.topics
        self.store = ReplicaStore(Path(settings.data_dir) / "replica.db")
        receive_streams(
            self.rt, PART, SYNC_MESSAGE, self.store.apply, bad="bad_sync", max_bytes=MAX_MESSAGE_BYTES
        )

    def start(self) -> None:
        """Returns at once and keeps trying the cloud broker (it may come up later); a stop
        request is heard meanwhile."""
        self.rt.start(wait_s=None)
        mqtt = self.settings.mqtt
        log.info("replica started", extra={"db": str(self.store.path), "broker": f"{mqtt.host}:{mqtt.port}"})
        if not self.bus.wait_connected(5.0):
            log.warning("no cloud broker answers yet; retrying", extra={"broker": f"{mqtt.host}:{mqtt.port}"})

    def stop(self) -> None:
        self.rt.stop()
        self.store.close()


def run(settings: OutpostSettings, stop: threading.Event) -> CloudReplica:
    return run_until(CloudReplica(settings), stop)


def main() -> None:
    service_main(CloudReplica, OutpostSettings)
