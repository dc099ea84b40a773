"""Long-term memory: items with a vector, retrieved by similarity, on the device.

SQLite (WAL, ``synchronous=FULL``) is the source of truth: every item's metadata, payload and
vector. A usearch HNSW index (cosine) answers the similarity queries; it is saved beside the
database and, when it is missing, damaged or behind the database after a crash, rebuilt from the
vectors in SQLite at open, so the index never has to be trusted more than the file it came from.
docs/memory.md says why usearch (measured against sqlite-vec on this machine).

* ``namespace`` separates kinds of memory (``sensor-situations``, ``notes``...) and is a filter of
  every query; ``subject`` says whom an item is about (a device, a customer) so that a privacy
  request deletes everything of one subject; ``meta`` holds flat fields that queries filter on by
  equality.
* Retention: a TTL per item, and :meth:`evict` by age, by count budget (least recently used first:
  a query touches what it returns) and by subject. Every removal leaves the index and SQLite
  together.
"""

from __future__ import annotations

import base64
import contextlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# onnxruntime must be loaded before usearch: usearch's extension carries its own static libstdc++,
# and onnxruntime loaded after it crashes (SIGSEGV in std::codecvt at import, usearch 2.26.6 with
# onnxruntime 1.32.0). The memory service uses both (text embeddings); tests/unit/test_vectors.py
# checks the order holds.
import onnxruntime  # noqa: F401
import orjson
from usearch.index import Index

from outpost.errors import OutpostError
from outpost.store import Store, sequence, transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    subject TEXT NOT NULL DEFAULT '',
    meta BLOB NOT NULL,
    payload BLOB NOT NULL,
    vector BLOB NOT NULL,
    created_ns INTEGER NOT NULL,
    used_ns INTEGER NOT NULL,
    expires_ns INTEGER
);
CREATE INDEX IF NOT EXISTS items_ns ON items (namespace);
CREATE INDEX IF NOT EXISTS items_subject ON items (subject);
CREATE INDEX IF NOT EXISTS items_used ON items (used_ns);
CREATE INDEX IF NOT EXISTS items_created ON items (created_ns);
CREATE INDEX IF NOT EXISTS items_expires ON items (expires_ns) WHERE expires_ns IS NOT NULL;
CREATE TABLE IF NOT EXISTS changes (
    "offset" INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,
    key INTEGER NOT NULL,
    at_s INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_at ON changes (at_s);
"""
# The retention's deletes (evict, expire_changes) run on the memory service's network thread every
# ``memory.compact_s``: each reads what it deletes through an index (items_created, items_expires,
# changes_at), where a scan of 100,000 items took 60-77 ms per statement (tests/unit/test_upkeep_plans.py).

# Every insert and delete of an item leaves a change, in the same transaction (a trigger), so the
# cloud replica (sync.py) follows the device's long-term memory exactly, evictions and privacy
# deletions included, and resumes from an offset. Without sync the triggers are not there.
_TRACK = """
CREATE TRIGGER IF NOT EXISTS items_added AFTER INSERT ON items
BEGIN INSERT INTO changes (op, key, at_s) VALUES ('add', new.key, unixepoch()); END;
CREATE TRIGGER IF NOT EXISTS items_removed AFTER DELETE ON items
BEGIN INSERT INTO changes (op, key, at_s) VALUES ('del', old.key, unixepoch()); END;
"""
_UNTRACK = """
DROP TRIGGER IF EXISTS items_added;
DROP TRIGGER IF EXISTS items_removed;
DELETE FROM changes;
"""

EXPIRED_ITEMS = "expires_ns IS NOT NULL AND expires_ns <= ?"
AGED_ITEMS = "created_ns < ?"
EXPIRE_CHANGES = "DELETE FROM changes WHERE at_s < ?"
"""The retention's choices of items (expired; older than ``memory.ltm_max_age_s``) and of changes
the cloud never took, each read through its index (above)."""

EXACT_UP_TO = 1024
"""An index of at most this many items is searched exhaustively: exact results (HNSW missed an
item's own vector 1 time in 200 on 300 random 16-dimensional vectors, and failed a test so), at
this size as fast as walking the graph (~60-70 us at 300 items; at 2,048 x 384 dimensions exact
takes 390 us against 310)."""

MAX_PAYLOAD_BYTES = 64 * 1024
Vector = npt.NDArray[np.float32]


class VectorMemoryError(OutpostError):
    """A long-term memory request is invalid, or its files cannot be used."""


@dataclass(frozen=True, slots=True)
class Hit:
    key: int
    score: float
    """Cosine similarity, 1 for the same direction."""
    namespace: str
    subject: str
    meta: dict[str, Any]
    payload: Any


@dataclass(frozen=True, slots=True)
class Eviction:
    expired: int
    aged: int
    over_budget: int


class LongTermMemory:
    def __init__(
        self, folder: Path, *, dim: int, expansion_search: int = 64, track_changes: bool = False
    ) -> None:
        if not 1 <= dim <= 4096:
            raise VectorMemoryError(f"dim must be 1..4096, got {dim}")
        self.dim = dim
        self.folder = folder
        self.index_path = folder / "vectors.usearch"
        self._lock = threading.RLock()
        try:
            self.store = Store(folder / "vectors.db", _SCHEMA, synchronous="FULL")
        except sqlite3.DatabaseError as exc:
            raise VectorMemoryError(
                f"long-term memory {folder / 'vectors.db'} cannot be used ({exc})"
            ) from None
        self.db = self.store.db
        tracked = self.db.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name = 'items_added'"
        ).fetchone()[0]
        self.tracking_started = track_changes and not tracked
        """Changes were not recorded until now (a new store, or sync was off): what the cloud
        holds, if anything, is not this store's history (see :meth:`snapshot_changes`)."""
        if track_changes and not tracked:
            self.db.executescript(_TRACK)
        elif not track_changes and (tracked or self.db.execute("SELECT 1 FROM changes LIMIT 1").fetchone()):
            self.db.executescript(_UNTRACK)
        # else nothing to write: a start on a full disk must not fail for a write it did not need
        self._expansion_search = expansion_search
        self.rebuilt = False
        """Whether opening rebuilt the index from SQLite (missing, damaged or stale file)."""
        self._touched: dict[int, int] = {}
        """When each item was last returned, not yet written to SQLite (see :meth:`flush_usage`)."""
        self.index = self._open_index()

    # --- index -----------------------------------------------------------------------------------
    def _new_index(self) -> Index:
        return Index(ndim=self.dim, metric="cos", dtype="f32", expansion_search=self._expansion_search)

    def _open_index(self) -> Index:
        count = int(self.db.execute("SELECT count(*) FROM items").fetchone()[0])
        index = self._new_index()
        if self.index_path.is_file():
            try:
                index.load(str(self.index_path))
            except Exception:  # noqa: BLE001 (usearch raises RuntimeError and others for a bad file)
                index = self._new_index()
        if len(index) != count or index.ndim != self.dim:
            index = self._rebuild()
        return index

    def _rebuild(self) -> Index:
        """The index from the vectors in SQLite (after a crash, or a lost or damaged index file)."""
        index = self._new_index()
        rows = self.db.execute("SELECT key, vector FROM items").fetchall()
        if rows:
            keys = np.array([r[0] for r in rows], dtype=np.uint64)
            vectors = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
            if vectors.shape[1] != self.dim:
                raise VectorMemoryError(f"stored vectors have {vectors.shape[1]} dimensions, not {self.dim}")
            index.add(keys, vectors)
        self.rebuilt = True
        return index

    def save(self) -> None:
        """Write the index beside the database (atomically: temporary file, then rename)."""
        with self._lock:
            tmp = self.index_path.with_suffix(".tmp")
            self.index.save(str(tmp))
            tmp.replace(self.index_path)

    def close(self) -> None:
        self.flush_usage()
        with contextlib.suppress(OSError):
            self.save()
        self.store.close()

    # --- writing ---------------------------------------------------------------------------------
    def _vector(self, v: Any) -> Vector:
        try:
            arr = np.asarray(v, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise VectorMemoryError(f"a vector must be {self.dim} numbers: {exc}") from None
        if arr.shape != (self.dim,):
            raise VectorMemoryError(f"a vector must have {self.dim} dimensions, got {arr.shape[0]}")
        if not np.all(np.isfinite(arr)):
            raise VectorMemoryError("a vector must be finite (no NaN or infinity)")
        norm = float(np.linalg.norm(arr))
        if norm == 0.0:
            raise VectorMemoryError("a vector must not be all zeros (it has no direction)")
        return arr / norm

    def add(
        self,
        namespace: str,
        vector: Any,
        payload: Any,
        *,
        subject: str = "",
        meta: dict[str, str | int | float | bool] | None = None,
        ttl_s: float | None = None,
    ) -> int:
        """Store an item; its key."""
        v = self._vector(vector)
        try:
            body = orjson.dumps(payload)
            meta_blob = orjson.dumps(meta or {})
        except TypeError as exc:
            raise VectorMemoryError(f"payload and meta must be JSON: {exc}") from None
        if len(body) > MAX_PAYLOAD_BYTES:
            raise VectorMemoryError(f"the payload is {len(body)} bytes, more than {MAX_PAYLOAD_BYTES}")
        if meta and not all(isinstance(x, str | int | float | bool) for x in meta.values()):
            raise VectorMemoryError("meta values must be flat (str, int, float, bool)")
        now = time.time_ns()
        expires = now + int(ttl_s * 1e9) if ttl_s is not None else None
        with self._lock:
            cur = self.db.execute(
                "INSERT INTO items (namespace, subject, meta, payload, vector, created_ns, used_ns, "
                "expires_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (namespace, subject, meta_blob, body, v.tobytes(), now, now, expires),
            )
            key = int(cur.lastrowid or 0)
            self.index.add(np.uint64(key), v)
            return key

    def add_many(
        self,
        namespace: str,
        vectors: Any,
        payloads: list[Any],
        *,
        subject: str = "",
        ttl_s: float | None = None,
    ) -> list[int]:
        """Store many items of one namespace in one transaction (one fsync) and one index call."""
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.dim or arr.shape[0] != len(payloads):
            raise VectorMemoryError(f"vectors must be ({len(payloads)}, {self.dim}), got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise VectorMemoryError("vectors must be finite (no NaN or infinity)")
        norms = np.linalg.norm(arr, axis=1, keepdims=True)
        if np.any(norms == 0.0):
            raise VectorMemoryError("a vector must not be all zeros (it has no direction)")
        arr = arr / norms
        bodies = [orjson.dumps(p) for p in payloads]
        if any(len(b) > MAX_PAYLOAD_BYTES for b in bodies):
            raise VectorMemoryError(f"a payload is more than {MAX_PAYLOAD_BYTES} bytes")
        now = time.time_ns()
        expires = now + int(ttl_s * 1e9) if ttl_s is not None else None
        with self._lock:
            with transaction(self.db) as db:
                first = int(db.execute("SELECT coalesce(max(key), 0) FROM items").fetchone()[0]) + 1
                first = max(first, sequence(db, "items") + 1)
                keys = list(range(first, first + len(bodies)))
                db.executemany(
                    "INSERT INTO items (key, namespace, subject, meta, payload, vector, created_ns, used_ns, "
                    "expires_ns) VALUES (?, ?, ?, '{}', ?, ?, ?, ?, ?)",
                    [
                        (k, namespace, subject, b, arr[i].tobytes(), now, now, expires)
                        for i, (k, b) in enumerate(zip(keys, bodies, strict=True))
                    ],
                )
            self.index.add(np.array(keys, dtype=np.uint64), arr)
            return keys

    def delete(self, key: int) -> bool:
        with self._lock:
            n = self.db.execute("DELETE FROM items WHERE key = ?", (key,)).rowcount
            if n:
                self.index.remove(key)
            return bool(n)

    def delete_subject(self, subject: str) -> int:
        """A privacy request: every item about ``subject`` goes, from SQLite and from the index."""
        if not subject:
            raise VectorMemoryError("a subject is needed to delete by subject")
        return self._delete_where("subject = ?", (subject,))

    def _delete_where(self, where: str, args: tuple[Any, ...]) -> int:
        with self._lock:
            keys = [int(r[0]) for r in self.db.execute(f"SELECT key FROM items WHERE {where}", args)]
            if not keys:
                return 0
            self.db.execute(f"DELETE FROM items WHERE {where}", args)
            self.index.remove(np.array(keys, dtype=np.uint64))
            return len(keys)

    def flush_usage(self) -> None:
        """Write when items were last returned (one transaction); eviction and close do it."""
        with self._lock:
            if not self._touched:
                return
            touched, self._touched = self._touched, {}
            self.store.write_many(
                "UPDATE items SET used_ns = ? WHERE key = ?", [(t, k) for k, t in touched.items()]
            )

    def evict(self, *, max_age_s: float | None = None, max_items: int | None = None) -> Eviction:
        """Retention: expired items, items older than ``max_age_s``, then the least recently used
        beyond ``max_items``."""
        self.flush_usage()
        now = time.time_ns()
        expired = self._delete_where(EXPIRED_ITEMS, (now,))
        aged = 0
        if max_age_s is not None:
            aged = self._delete_where(AGED_ITEMS, (now - int(max_age_s * 1e9),))
        over = 0
        if max_items is not None:
            with self._lock:
                count = int(self.db.execute("SELECT count(*) FROM items").fetchone()[0])
                if count > max_items:
                    over = self._delete_where(
                        "key IN (SELECT key FROM items ORDER BY used_ns ASC, key ASC LIMIT ?)",
                        (count - max_items,),
                    )
        return Eviction(expired, aged, over)

    # --- changes, for the cloud replica ------------------------------------------------------------
    def changes_after(self, offset: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """The changes after ``offset``, oldest first, as sync records: ``add`` with the whole item
        (the vector as base64 float32), ``del``, or ``gone`` for an add whose item was removed
        since (its ``del`` follows)."""
        rows = self.db.execute(
            'SELECT c."offset", c.op, c.key, i.namespace, i.subject, i.meta, i.payload, i.vector, '
            "i.created_ns, i.expires_ns FROM changes c LEFT JOIN items i ON c.op = 'add' AND "
            'i.key = c.key WHERE c."offset" > ? ORDER BY c."offset" LIMIT ?',
            (offset, limit),
        ).fetchall()
        out: list[tuple[int, dict[str, Any]]] = []
        for off, op, key, ns, subject, meta, payload, vector, created, expires in rows:
            if op == "add" and ns is not None:
                body: dict[str, Any] = {
                    "op": "add",
                    "key": key,
                    "namespace": ns,
                    "subject": subject,
                    "meta": orjson.loads(meta),
                    "payload": orjson.loads(payload),
                    "vector": base64.b64encode(vector).decode(),
                    "created_ns": created,
                    "expires_ns": expires,
                }
            else:
                body = {"op": "gone" if op == "add" else "del", "key": key}
            out.append((int(off), body))
        return out

    def snapshot_changes(self) -> int:
        """Replace the recorded changes with one ``add`` for every item there is: the whole store
        for a replica that starts from nothing. The number of items."""
        with self._lock, transaction(self.db) as db:
            db.execute("DELETE FROM changes")
            n = db.execute(
                "INSERT INTO changes (op, key, at_s) SELECT 'add', key, unixepoch() FROM items ORDER BY key"
            ).rowcount
        return int(n)

    def trim_changes(self, upto: int) -> int:
        """Forget the changes the cloud has acknowledged."""
        with self._lock:
            return self.db.execute('DELETE FROM changes WHERE "offset" <= ?', (upto,)).rowcount

    def expire_changes(self, before_ns: int) -> int:
        """Forget changes recorded before ``before_ns`` that the cloud never took (a long outage)."""
        with self._lock:
            return self.db.execute(EXPIRE_CHANGES, (before_ns // 1_000_000_000,)).rowcount

    def last_change(self) -> int:
        return sequence(self.db, "changes")

    def pending_changes(self, after: int) -> tuple[int, int | None]:
        """How many changes after ``after`` are kept, and when the oldest of them was recorded
        (wall ns, to the second: the trigger stamps ``unixepoch()``; None when there are none)."""
        with self._lock:  # the request API's worker may be writing
            n, oldest_s = self.db.execute(
                'SELECT COUNT(*), MIN(at_s) FROM changes WHERE "offset" > ?', (after,)
            ).fetchone()
        return int(n), None if oldest_s is None else int(oldest_s) * 1_000_000_000

    # --- reading ---------------------------------------------------------------------------------
    def search(
        self,
        namespace: str,
        vector: Any,
        *,
        k: int = 10,
        subject: str | None = None,
        where: dict[str, str | int | float | bool] | None = None,
    ) -> list[Hit]:
        """The ``k`` most similar live items of ``namespace`` (and ``subject``, and whose meta has
        every field of ``where``), best first."""
        if not 1 <= k <= 1000:
            raise VectorMemoryError(f"k must be 1..1000, got {k}")
        q = self._vector(vector)
        now = time.time_ns()
        with self._lock:
            total = len(self.index)
            if total == 0:
                return []
            want = min(total, k * 4)
            while True:
                matches = self.index.search(q, want, exact=total <= EXACT_UP_TO)
                keys = [int(x) for x in matches.keys]
                dists = {int(x): float(d) for x, d in zip(matches.keys, matches.distances, strict=True)}
                hits = self._filtered(keys, dists, namespace, subject, where, now)
                if len(hits) >= k or want >= total:
                    break
                want = min(total, want * 4)  # filters left too few: look wider
            hits = hits[:k]
            for h in hits:  # written in one go before eviction: a write (an fsync) per query
                self._touched[h.key] = now  # would be most of a query's time
            return hits

    def _filtered(
        self,
        keys: list[int],
        dists: dict[int, float],
        namespace: str,
        subject: str | None,
        where: dict[str, Any] | None,
        now: int,
    ) -> list[Hit]:
        if not keys:
            return []
        marks = ",".join("?" * len(keys))
        rows = self.db.execute(
            f"SELECT key, namespace, subject, meta, payload, expires_ns FROM items WHERE key IN ({marks})",
            keys,
        ).fetchall()
        out = []
        for key, ns, subj, meta_blob, payload, expires in rows:
            if ns != namespace or (subject is not None and subj != subject):
                continue
            if expires is not None and expires <= now:
                continue
            meta = orjson.loads(meta_blob)
            if where and any(meta.get(f) != v for f, v in where.items()):
                continue
            out.append(Hit(int(key), 1.0 - dists[int(key)], ns, subj, meta, orjson.loads(payload)))
        out.sort(key=lambda h: -h.score)
        return out

    def __len__(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM items").fetchone()[0])
