"""The memory benchmark, operational-log part: durable appends/s with batching next to raw SQLite
inserts of the same rows on the same disk with the same durability, in one run.

* **raw**: a plain table (rowid + the same columns, no index), ``executemany`` in one transaction
  a batch, ``journal_mode=WAL``, ``synchronous`` as the log's;
* **oplog**: :class:`outpost.services.memory.oplog.OpLog.append` (AUTOINCREMENT offsets, trace and
  time indexes), batches of 1, 100 and 1,000 records, ~110-byte event bodies.

Target (issue 4): >= 50,000 durable appends/s batched. The vector-memory figures come with that part.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from outpost.services.memory.oplog import OpLog, Record, Sync

TARGET_APPENDS_PER_S = 50_000.0
BODY = (
    b'{"v":1,"id":"6b0f2a3c1d9e8f7a6b5c4d3e","ts":1795800000000000000,"device":"shelf-004",'
    b'"metric":"shelf_weight","value":12.5}'
)


def _records(n: int) -> list[Record]:
    base = time.time_ns()
    return [
        Record(base + i, "event", f"{i:024x}", "outpost/v1/site1/events/shelf-004", BODY) for i in range(n)
    ]


def _raw(path: Path, records: list[Record], batch: int, sync: Sync) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={sync}")
    db.execute(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, ts INTEGER, at INTEGER, kind TEXT, trace TEXT, "
        "topic TEXT, body BLOB)"
    )
    now = time.time_ns()
    rows = [(r.ts, now, r.kind, r.trace, r.topic, r.body) for r in records]
    t = time.perf_counter()
    for i in range(0, len(rows), batch):
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO t (ts, at, kind, trace, topic, body) VALUES (?, ?, ?, ?, ?, ?)", rows[i : i + batch]
        )
        db.execute("COMMIT")
    elapsed = time.perf_counter() - t
    db.close()
    return len(rows) / elapsed


def _oplog(path: Path, records: list[Record], batch: int, sync: Sync) -> float:
    log = OpLog(path, synchronous=sync)
    t = time.perf_counter()
    for i in range(0, len(records), batch):
        log.append(records[i : i + batch])
    elapsed = time.perf_counter() - t
    log.close()
    return len(records) / elapsed


def run_memory_bench(*, quick: bool = False, sync: Sync = "FULL") -> dict[str, Any]:
    n = 20_000 if quick else 100_000
    out: dict[str, Any] = {"bench": "memory", "sync": sync, "records": n, "body_bytes": len(BODY), "log": {}}
    with tempfile.TemporaryDirectory(prefix="outpost-bench-mem-") as tmp:
        d = Path(tmp)
        for batch in (1, 100, 1000):
            m = n if batch > 1 else max(500, n // 50)  # one fsync a record: a smaller sample
            recs = _records(m)
            raw = _raw(d / f"raw{batch}.db", recs, batch, sync)
            log = _oplog(d / f"log{batch}.db", recs, batch, sync)
            out["log"][str(batch)] = {
                "records": m,
                "raw_per_s": round(raw),
                "oplog_per_s": round(log),
                "ratio": round(log / raw, 3),
            }
    best = out["log"]["1000"]["oplog_per_s"]
    out["targets"] = {"appends_per_s_min": TARGET_APPENDS_PER_S, "appends_met": best >= TARGET_APPENDS_PER_S}
    return out
