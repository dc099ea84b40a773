"""What sync is built from, on real SQLite and real files: long-term memory records its changes in
the same transaction as the change (only when sync is on), the log summarises an offset range
without reading bodies, and the uplink bridge config carries what Mosquitto needs and keeps its
password out of anything but the broker's own 0600 config."""

from __future__ import annotations

import base64
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from outpost.broker import Mosquitto, uplink_bridge
from outpost.services.memory.oplog import OpLog, Record
from outpost.services.memory.sync import _SCHEMA, Summaries, sync_on
from outpost.services.memory.vectors import LongTermMemory
from outpost.services.registry import OutpostSettings
from outpost.settings import UplinkSettings
from outpost.store import Store


def test_long_term_memory_records_every_change_when_tracking(tmp_path: Path) -> None:
    ltm = LongTermMemory(tmp_path / "ltm", dim=4, track_changes=True)
    k1 = ltm.add("n", [1, 0, 0, 0], {"a": 1}, subject="alice", meta={"x": 1})
    keys = ltm.add_many("n", np.eye(4)[1:], [{"b": i} for i in range(3)], subject="bob")
    ltm.delete_subject("bob")
    changes = ltm.changes_after(0, 100)
    assert [o for o, _ in changes] == list(range(1, 8))
    assert [b["op"] for _, b in changes] == ["add", "gone", "gone", "gone", "del", "del", "del"]
    first = changes[0][1]
    assert first["key"] == k1 and first["payload"] == {"a": 1} and first["meta"] == {"x": 1}
    assert np.frombuffer(base64.b64decode(first["vector"]), dtype=np.float32).tolist() == [
        1,
        0,
        0,
        0,
    ]
    assert sorted(b["key"] for _, b in changes[4:]) == keys
    assert ltm.last_change() == 7 and [o for o, _ in ltm.changes_after(5, 100)] == [6, 7]
    assert ltm.trim_changes(5) == 5 and [o for o, _ in ltm.changes_after(0, 100)] == [6, 7]
    ltm.close()
    # reopened without sync: no triggers, no backlog
    ltm = LongTermMemory(tmp_path / "ltm", dim=4, track_changes=False)
    ltm.add("n", [0, 0, 0, 1], 1)
    assert ltm.changes_after(0, 100) == []
    ltm.close()


def test_the_log_summary_counts_kinds_and_topics_of_an_offset_range(tmp_path: Path) -> None:
    log = OpLog(tmp_path / "log.db")
    recs = [Record(10 + i, "event", f"t{i}", f"r/events/d{i % 2}", b"{}") for i in range(6)]
    recs += [
        Record(100, "score", "t1", "r/inference/m/d1", b"{}"),
        Record(5, "dlq", "", "r/dlq/ingest", b"x"),
    ]
    log.append(recs)
    s = log.summary(0, 8)
    assert s["entries"] == 8 and s["by_kind"] == {"event": 6, "score": 1, "dlq": 1}
    assert s["by_topic"] == {"r/events/d0": 3, "r/events/d1": 3, "r/inference/m/d1": 1, "r/dlq/ingest": 1}
    assert (s["first_ts"], s["last_ts"]) == (5, 100)
    assert log.summary(2, 4)["entries"] == 2
    empty = log.summary(8, 8)
    assert empty["entries"] == 0 and empty["by_kind"] == {} and empty["first_ts"] is None
    log.close()


def test_the_next_summary_starts_where_the_last_ended_after_the_cloud_has_taken_it(tmp_path: Path) -> None:
    """The summaries the cloud acknowledged are deleted; where the last one ended is kept apart, so
    a crash after a summary is stored and before the log's ``sync`` mark moves (the mark still at 0)
    does not make the next summary start at offset 0 again: the cloud would hold two covering it."""
    summaries = Summaries(Store(tmp_path / "sync.db", _SCHEMA))
    assert summaries.summarized() == 0
    summaries.add(300, b"{}")
    summaries.add(450, b"{}")
    assert summaries.summarized() == 450
    summaries.trim(summaries.last())  # the cloud acknowledged both
    assert summaries.after(0, 10) == [] and summaries.summarized() == 450
    summaries.add(500, b"{}")
    summaries.expire(time.time_ns() + 1)  # retention, too, keeps the mark
    assert summaries.summarized() == 500


def test_the_uplink_bridge_config(tmp_path: Path) -> None:
    s = OutpostSettings(site="shop-1", data_dir=tmp_path)
    assert uplink_bridge(s.topics, UplinkSettings()) == []
    up = UplinkSettings(cloud="cloud.example:8883", username="shop-1", password="s3cret")
    lines = uplink_bridge(s.topics, up)
    assert "connection outpost-shop-1-uplink" in lines and "cleansession false" in lines
    assert "topic outpost/v1/shop-1/up/# out 1" in lines and "topic outpost/v1/shop-1/down/# in 1" in lines
    assert s.topics.uplink_state() == "$SYS/broker/connection/outpost-shop-1-uplink/state"
    assert "s3cret" not in repr(up) and "s3cret" not in str(s.model_dump())
    conf = Mosquitto(tmp_path / "b", extra_conf=lines).write_config()
    assert "remote_password s3cret" in conf.read_text()
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("cloud", "HOST:PORT"),
        ("cloud:", "HOST:PORT"),
        (":1883", "HOST:PORT"),
        ("cloud:0", "HOST:PORT"),
        ("cloud:99999", "HOST:PORT"),
        ("cloud:x", "HOST:PORT"),
        # each of these went into the broker's config as written, some bridging elsewhere
        ("127.0.0.1 :1", "name or an IPv4"),  # Mosquitto read a list: it bridged to :1883
        ("a b:1", "name or an IPv4"),
        ("http://127.0.0.1:1", "name or an IPv4"),
        ("127.0.0.1:1:2", "name or an IPv4"),
        ("[::1]:1", "name or an IPv4"),
        ("127.0.0.1:1\ntopic # both 0\naddress 127.0.0.1:1", "name or an IPv4"),
    ],
)
def test_a_bad_uplink_address_is_a_clear_error(bad: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        UplinkSettings(cloud=bad)


@pytest.mark.parametrize("field", ["username", "password"])
@pytest.mark.parametrize("bad", ["u\ntopic # both 0", "two words", "", "x" * 257, "tab\there"])
def test_uplink_credentials_cannot_add_config_lines(field: str, bad: str) -> None:
    with pytest.raises(ValidationError, match="without spaces or line breaks") as e:
        UplinkSettings(cloud="cloud:1883", **{field: bad})
    if field == "password" and bad:
        assert bad not in str(e.value)  # a refused password is not shown either


def test_sync_is_on_where_there_is_an_uplink(tmp_path: Path) -> None:
    s = OutpostSettings(site="shop-1", data_dir=tmp_path)
    assert not sync_on(s)  # auto, and no uplink: nothing is kept for a cloud
    s.uplink.cloud = "cloud:1883"
    assert sync_on(s)
    s.memory.sync = "off"
    assert not sync_on(s)
    with pytest.raises(ValidationError):
        OutpostSettings(memory={"sync": "always"})  # what it used to take: said, not ignored


def test_changes_the_cloud_never_took_expire(tmp_path: Path) -> None:
    ltm = LongTermMemory(tmp_path / "ltm", dim=2, track_changes=True)
    ltm.add("n", [1, 0], 1)
    ltm.db.execute("UPDATE changes SET at_s = at_s - 100")
    ltm.add("n", [0, 1], 2)
    assert ltm.expire_changes(time.time_ns() - 50 * 1_000_000_000) == 1
    assert [b["payload"] for _, b in ltm.changes_after(0, 10)] == [2]
    ltm.close()


def test_a_refused_password_is_not_repeated_by_the_whole_settings() -> None:
    with pytest.raises(ValidationError) as e:
        OutpostSettings(uplink={"cloud": "cloud:1883", "password": "two words"})
    assert "two words" not in str(e.value)
