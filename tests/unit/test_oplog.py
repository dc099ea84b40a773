"""The operational log on a real SQLite file: monotonic offsets, readers that resume, replay by
offset, time and trace, retention that keeps what a consumer has not acknowledged unless the disk
budget forces it, and kill -9 during appends loses nothing that was acknowledged."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from outpost.services.memory.oplog import LogError, OpLog, Record
from tests.conftest import kill_9_after


def rec(i: int, *, trace: str | None = None, kind: str = "event", ts: int | None = None) -> Record:
    return Record(
        ts=ts if ts is not None else 1_000_000_000 + i,
        kind=kind,
        trace=trace or f"t{i}",
        topic="outpost/v1/s/events/d",
        body=b'{"i":%d}' % i,
    )


@pytest.fixture
def log(tmp_path: Path) -> OpLog:
    return OpLog(tmp_path / "oplog.db")


def test_offsets_are_monotonic_and_never_reused(log: OpLog) -> None:
    assert log.append([]) == (0, 0)
    assert log.append([rec(i) for i in range(5)]) == (1, 5)
    assert log.append([rec(5)]) == (6, 6)
    log.register("c")
    log.ack("c", 6)
    assert log.compact(max_age_s=0).removed == 6
    assert log.count() == 0
    assert log.append([rec(7)]) == (7, 7)  # not 1 again
    assert [e.offset for e in log.read(0)] == [7]


def test_readers_resume_from_their_acknowledged_offset_after_a_restart(tmp_path: Path) -> None:
    log = OpLog(tmp_path / "l.db")
    log.append([rec(i) for i in range(10)])
    assert log.register("agent") == 0
    batch = log.read(log.position("agent"), limit=4)
    assert [e.offset for e in batch] == [1, 2, 3, 4]
    log.ack("agent", batch[-1].offset)
    log.ack("agent", 2)  # an old ack replayed: never moves back
    log.close()
    again = OpLog(tmp_path / "l.db")
    assert again.position("agent") == 4
    assert [e.offset for e in again.read(again.position("agent"))] == [5, 6, 7, 8, 9, 10]
    with pytest.raises(LogError, match="log ends at 10"):
        again.ack("agent", 11)
    with pytest.raises(LogError, match="unknown consumer"):
        again.position("nobody")
    again.close()


def test_replay_by_offset_time_trace_and_kind(log: OpLog) -> None:
    log.append(
        [rec(i, trace="A" if i % 3 == 0 else None, kind="score" if i % 2 else "event") for i in range(30)]
    )
    assert [e.offset for e in log.replay(from_offset=5, to_offset=8)] == [5, 6, 7, 8]
    # ts = 1e9 + i for offset i + 1
    assert [e.offset for e in log.replay(since_ns=1_000_000_010, until_ns=1_000_000_013)] == [11, 12, 13]
    assert [e.offset for e in log.trace("A")] == [1, 4, 7, 10, 13, 16, 19, 22, 25, 28]
    assert all(e.kind == "score" for e in log.replay(kind="score"))
    assert [e.offset for e in log.replay(trace="A", kind="score")] == [4, 10, 16, 22, 28]
    assert [e.offset for e in log.tail(3)] == [28, 29, 30]
    assert log.replay(trace="nothing") == []


def test_age_retention_never_removes_what_a_consumer_has_not_acknowledged(log: OpLog) -> None:
    old = time.time_ns() - 3600 * 10**9
    log.append([rec(i, ts=old) for i in range(10)])
    log.register("slow")
    log.ack("slow", 4)
    c = log.compact(max_age_s=60)
    assert (c.removed, c.forced) == (4, 0)
    assert [e.offset for e in log.read(0)] == [5, 6, 7, 8, 9, 10]


def test_the_disk_budget_forces_removal_and_counts_it(log: OpLog) -> None:
    big = b"x" * 2000
    log.append([Record(i, "event", f"t{i}", "t", big) for i in range(3000)])
    log.register("stuck")  # never acknowledges anything
    before = log.size_bytes()
    c = log.compact(max_bytes=before // 4)
    assert c.bytes_after <= before // 4 < c.bytes_before
    assert c.forced == c.removed > 0
    assert log.forced_total() == c.forced
    # what is left is the newest, contiguous
    left = [e.offset for e in log.read(0, limit=10_000)]
    assert left == list(range(3001 - len(left), 3001))


def test_budget_takes_acknowledged_entries_first(log: OpLog) -> None:
    big = b"y" * 2000
    log.append([Record(i, "event", f"t{i}", "t", big) for i in range(2000)])
    log.register("c")
    log.ack("c", 1500)
    c = log.compact(max_bytes=log.size_bytes() // 2)
    assert c.removed > 0 and c.forced == 0


def test_a_damaged_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database at all" * 200)
    with pytest.raises(LogError, match="cannot be used"):
        OpLog(bad)


WRITER = """
import sys
from pathlib import Path
from outpost.services.memory.oplog import OpLog, Record
log = OpLog(Path(sys.argv[1]))
i = 0
while True:
    first, last = log.append([Record(i + k, "event", f"t{i + k}", "t", b"x" * 100) for k in range(200)])
    i += 200
    print(last, flush=True)  # acknowledged: the batch is committed
"""


def test_kill_9_during_appends_loses_nothing_that_was_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    acked = kill_9_after(WRITER, str(path), 20_000)
    log = OpLog(path)
    offsets = [e.offset for e in log.read(0, limit=10**7)]
    assert len(offsets) >= acked and offsets[:acked] == list(range(1, acked + 1))
    assert offsets == list(range(1, len(offsets) + 1))  # no hole, whatever was in flight
    log.close()


def test_a_message_id_already_logged_is_not_appended_again(log: OpLog) -> None:
    """A redelivered message (committed, then a crash before its acknowledgement) or a dead letter
    sent twice across a reconnect carries the same id: logged once, and the offsets stay dense."""
    first = [Record(i, "event", f"t{i}", "t", b"{}", mid=f"event:e{i}") for i in range(4)]
    assert log.append(first) == (1, 4)
    again = [
        Record(9, "event", "t2", "t", b"{}", mid="event:e2"),
        Record(9, "event", "t9", "t", b"{}", mid="event:e9"),
    ]
    assert log.append(again) == (5, 5)
    assert log.append(first[:2]) == (0, 0)
    assert log.append([Record(1, "dlq", "t1", "t", b"{}", mid="dlq:e1")]) == (6, 6)  # another kind
    assert log.append([rec(20), rec(20)]) == (7, 8)  # no id: always appended
    assert log.duplicates == 3
    assert [e.trace for e in log.read(0)] == ["t0", "t1", "t2", "t3", "t9", "t1", "t20", "t20"]


def test_a_log_written_before_message_ids_gains_them(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        'CREATE TABLE log ("offset" INTEGER PRIMARY KEY AUTOINCREMENT, ts INTEGER NOT NULL,'
        " at INTEGER NOT NULL, kind TEXT NOT NULL, trace TEXT NOT NULL, topic TEXT NOT NULL,"
        " body BLOB NOT NULL);"
        " INSERT INTO log (ts, at, kind, trace, topic, body)"
        " VALUES (1, 1, 'event', 'old', 't', x'7b7d');"
    )
    db.commit()
    db.close()
    log = OpLog(path)
    assert log.append([Record(2, "event", "new", "t", b"{}", mid="event:n")]) == (2, 2)
    assert log.append([Record(2, "event", "new", "t", b"{}", mid="event:n")]) == (0, 0)
    assert [e.trace for e in log.read(0)] == ["old", "new"]
