"""A full disk, recognised once (outpost.store) and reported by every service (outpost.disk).

SQLite's ``max_page_count`` gives a database the SQLITE_FULL a full disk gives, without one; the
integration test (tests/integration/test_memory_disk_full.py) fills a real file system.
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from outpost.disk import DiskWatch
from outpost.metrics import Metrics
from outpost.settings import DiskSettings
from outpost.store import DiskFull, Store, full_databases, is_disk_full, transaction

SCHEMA = "CREATE TABLE IF NOT EXISTS t (x BLOB);"


def capped(path: Path) -> Store:
    store = Store(path, SCHEMA)
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count={pages + 2}")  # a disk with two pages left
    return store


def test_a_write_that_fails_for_space_raises_disk_full_and_writes_nothing(tmp_path: Path) -> None:
    store = capped(tmp_path / "a.db")
    with pytest.raises(DiskFull) as e:
        store.write_many("INSERT INTO t VALUES (?)", [(b"x" * 4000,)] * 50)
    assert "disk full" in str(e.value) and e.value.path.endswith("a.db")
    assert isinstance(e.value.__cause__, sqlite3.OperationalError)  # the real error, not ROLLBACK's
    assert not store.db.in_transaction
    assert store.query("SELECT count(*) FROM t") == [(0,)]
    assert list(full_databases(tmp_path)) == [str((tmp_path / "a.db").resolve())]
    # space again: the same write succeeds and the database is no longer full
    store.db.execute("PRAGMA max_page_count=100000")
    store.write_many("INSERT INTO t VALUES (?)", [(b"x" * 4000,)] * 50)
    assert store.query("SELECT count(*) FROM t") == [(50,)]
    assert full_databases(tmp_path) == {}
    store.checkpoint()
    store.close()


def test_other_errors_are_not_disk_full(tmp_path: Path) -> None:
    store = Store(tmp_path / "b.db", SCHEMA)
    with pytest.raises(sqlite3.OperationalError), transaction(store.db) as db:
        db.execute("INSERT INTO nowhere VALUES (1)")
    with pytest.raises(KeyError), transaction(store.db) as db:  # the block's own error, rolled back
        db.execute("INSERT INTO t VALUES (1)")
        raise KeyError("mine")
    assert store.query("SELECT count(*) FROM t") == [(0,)]
    assert full_databases(tmp_path) == {}
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    store.close()


class Changes:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


def test_the_watch_reports_a_full_database_until_it_is_written_again(tmp_path: Path) -> None:
    metrics, changed = Metrics("t"), Changes()
    watch = DiskWatch(tmp_path, DiskSettings(warn_free_mb=0), metrics, changed)
    store = capped(tmp_path / "c.db")
    watch.poll()
    assert watch.problems == [] and changed.n == 0
    with pytest.raises(DiskFull):
        store.write_many("INSERT INTO t VALUES (?)", [(b"x" * 4000,)] * 50)
    watch.poll()
    assert watch.full and watch.problems[0].startswith("disk full: writes to ") and changed.n == 1
    assert metrics.counters["disk_full"] == 1 and watch.state()["disk_full"] is True
    watch.poll()
    assert changed.n == 1  # told once
    store.db.execute("PRAGMA max_page_count=100000")
    store.write_many("INSERT INTO t VALUES (?)", [(b"x",)])
    watch.poll()
    assert watch.problems == [] and changed.n == 2
    store.close()


def test_the_budget_warns_before_the_disk_is_full(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 3 * 1024 * 1024)
    changed = Changes()
    watch = DiskWatch(tmp_path, DiskSettings(warn_free_mb=10**9, max_data_mb=2), Metrics("t"), changed)
    watch.measure()
    low, over = watch.problems
    assert low.startswith("disk low: ") and "disk.warn_free_mb" in low
    assert over.startswith("data folder over budget: 3 MB") and "disk.max_data_mb 2" in over
    assert watch.state()["data_mb"] >= 3 and changed.n == 1
    watch.settings = DiskSettings(warn_free_mb=0, max_data_mb=0)
    watch.measure()
    assert watch.problems == [] and changed.n == 2


def test_ingests_sequence_store_goes_through_the_same_mechanism(tmp_path: Path) -> None:
    from outpost.services.ingest.seqstore import SeqStore
    from outpost.services.ingest.seqtrack import SeqState

    seqs = SeqStore(tmp_path / "seq.db", window=64)
    pages = seqs.store.db.execute("PRAGMA page_count").fetchone()[0]
    seqs.store.db.execute(f"PRAGMA max_page_count={pages}")
    states = {f"device-{i:05d}": SeqState(i, i, 1) for i in range(2000)}
    with pytest.raises(DiskFull):
        seqs.save(states)
    assert list(full_databases(tmp_path)) == [str((tmp_path / "seq.db").resolve())]
    seqs.store.db.execute("PRAGMA max_page_count=100000")
    seqs.save(states)  # the kit's retry of the same states: nothing lost
    assert len(seqs.load()) == 2000 and full_databases(tmp_path) == {}
    seqs.close()
