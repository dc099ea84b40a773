"""SQLite store (WAL) and the ingest seq-state store on top of it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from outpost.services.ingest.seqstore import SeqStore
from outpost.services.ingest.seqtrack import SeqState
from outpost.store import Store

SCHEMA = "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v INTEGER NOT NULL);"


def test_wal_is_on(tmp_path: Path) -> None:
    s = Store(tmp_path / "sub" / "a.db", SCHEMA)
    assert s.query("PRAGMA journal_mode")[0][0] == "wal"
    assert s.query("PRAGMA synchronous")[0][0] == 2  # FULL
    s.close()
    assert (tmp_path / "sub" / "a.db").exists()


def test_synchronous_normal(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.db", SCHEMA, synchronous="NORMAL")
    assert s.query("PRAGMA synchronous")[0][0] == 1
    s.close()


def test_write_many_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    s = Store(path, SCHEMA)
    s.write_many("INSERT INTO kv VALUES (?, ?)", [("a", 1), ("b", 2)])
    s.close()
    s = Store(path, SCHEMA)  # the schema applies again without harm
    assert s.query("SELECT k, v FROM kv ORDER BY k") == [("a", 1), ("b", 2)]
    s.close()


def test_write_many_is_all_or_nothing(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.db", SCHEMA)
    s.write_many("INSERT INTO kv VALUES (?, ?)", [("a", 1)])
    with pytest.raises(Exception, match="UNIQUE"):
        s.write_many("INSERT INTO kv VALUES (?, ?)", [("b", 2), ("a", 3)])
    assert s.query("SELECT k FROM kv") == [("a",)]
    s.write_many("INSERT INTO kv VALUES (?, ?)", [("c", 3)])  # usable after a rollback
    assert len(s.query("SELECT k FROM kv")) == 2
    s.close()


def test_readers_see_committed_writes(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    w, r = Store(path, SCHEMA), Store(path, SCHEMA)
    w.write_many("INSERT INTO kv VALUES (?, ?)", [("a", 1)])
    assert r.query("SELECT v FROM kv") == [(1,)]
    w.close()
    r.close()


def test_seqstore_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ingest.db"
    window = 4096
    states = {
        "d1": SeqState(10, 1_700_000_000_000_000_000, 0b1011),
        "d2": SeqState(2**62, 5, (1 << window) - 1),
    }
    s = SeqStore(path, window)
    assert s.load() == {}
    s.save(states)
    s.save({"d1": SeqState(11, 1_700_000_000_000_000_001, 0b10111)})
    s.save({})
    s.close()
    s = SeqStore(path, window)
    assert s.load() == {"d1": SeqState(11, 1_700_000_000_000_000_001, 0b10111), "d2": states["d2"]}
    s.close()


def test_seqstore_smaller_window_masks_on_load(tmp_path: Path) -> None:
    path = tmp_path / "ingest.db"
    s = SeqStore(path, 128)
    s.save({"d": SeqState(200, 1, (1 << 128) - 1)})
    s.close()
    s = SeqStore(path, 64)
    assert s.load()["d"].mask == (1 << 64) - 1
    s.close()


def test_seq_state_keeps_the_epoch_and_upgrades_an_old_database(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE seq_state (device TEXT PRIMARY KEY, last INTEGER NOT NULL, "
        "last_ts INTEGER NOT NULL, mask BLOB NOT NULL)"
    )
    db.execute("INSERT INTO seq_state VALUES ('d1', 7, 70, ?)", (b"\x01" + b"\x00" * 7,))
    db.commit()
    db.close()
    store = SeqStore(path, 64)
    assert store.load() == {"d1": SeqState(7, 70, 1, 0)}
    store.save({"d1": SeqState(0, 90, 1, 1)})
    store.close()
    assert SeqStore(path, 64).load() == {"d1": SeqState(0, 90, 1, 1)}
