"""The replica's protocol on real SQLite: records apply in order, a replay changes nothing, a gap
stops everything after it until the site resends, and a bad record rolls back its whole message."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from outpost.clouddb import sqlite_url
from outpost.services.memory.replica import Applied, ReplicaStore, SyncMessage


def add(key: int, subject: str = "s") -> dict[str, Any]:
    v = np.ones(4, dtype=np.float32).tobytes()
    return {
        "op": "add",
        "key": key,
        "namespace": "notes",
        "subject": subject,
        "meta": {"k": key},
        "payload": {"n": key},
        "vector": base64.b64encode(v).decode(),
        "created_ns": 1,
        "expires_ns": None,
    }


def msg(
    prev: int, records: list[tuple[int, dict[str, Any]]], stream: str = "ltm", epoch: str = "e1"
) -> SyncMessage:
    return SyncMessage.model_validate(
        {
            "v": 1,
            "id": "x",
            "site": "shop-1",
            "epoch": epoch,
            "stream": stream,
            "prev": prev,
            "records": records,
        }
    )


@pytest.fixture
def store(tmp_path: Path) -> ReplicaStore:
    return ReplicaStore(sqlite_url(tmp_path / "replica.db"))


def test_records_apply_in_order_and_a_replay_changes_nothing(store: ReplicaStore) -> None:
    assert store.apply(msg(0, [(1, add(1)), (2, add(2)), (4, add(4))])) == Applied(4, applied=3)
    assert store.apply(msg(4, [(5, {"op": "del", "key": 2}), (6, {"op": "gone", "key": 9})])) == Applied(6, 2)
    assert sorted(store.items("shop-1")) == [1, 4]
    # the same messages again: all duplicates, nothing changes
    assert store.apply(msg(0, [(1, add(1)), (2, add(2)), (4, add(4))])) == Applied(6, duplicates=3)
    assert sorted(store.items("shop-1")) == [1, 4]
    # overlapping: the held part is skipped, the rest applies
    overlap = [(5, {"op": "del", "key": 2}), (6, {"op": "gone", "key": 9}), (7, add(7))]
    assert store.apply(msg(4, overlap)) == Applied(7, applied=1, duplicates=2)
    assert sorted(store.items("shop-1")) == [1, 4, 7]
    assert store.items("other-site") == {}


def test_history_the_replica_never_had_is_asked_for_again(store: ReplicaStore) -> None:
    # the site trimmed 1..40 (this replica's state was lost, or the first message was): not taken
    assert store.apply(msg(40, [(41, add(41))])) == Applied(0, unknown=True)
    assert store.items("shop-1") == {} and store.last("shop-1", "ltm") == 0
    # the site sends the stream again from its start
    assert store.apply(msg(0, [(41, add(41)), (42, add(42))])) == Applied(42, applied=2)
    # a new sync state that does not start at 0 is not taken either
    assert store.apply(msg(7, [(8, add(8))], epoch="e2")) == Applied(0, unknown=True)
    assert sorted(store.items("shop-1")) == [41, 42]


def test_a_new_sync_state_of_the_site_replaces_its_memory(store: ReplicaStore) -> None:
    store.apply(msg(0, [(1, add(1)), (2, add(2)), (3, add(3))]))
    store.apply(msg(0, [(1, {"from_offset": 0, "to_offset": 5, "entries": 5})], stream="log"))
    # the gateway was wiped (or sync was off): a new epoch, its memory from the start again
    assert store.apply(msg(0, [(1, add(7))], epoch="e2")) == Applied(1, applied=1, reset=True)
    assert sorted(store.items("shop-1")) == [7]
    store.apply(msg(0, [(1, {"from_offset": 0, "to_offset": 2, "entries": 2})], stream="log", epoch="e2"))
    assert [s["to_offset"] for s in store.summaries("shop-1")] == [2]  # the current history
    assert store.overview()["shop-1"]["summaries"] == 2  # the old one is kept


def test_a_gap_stops_what_follows_until_it_is_resent(store: ReplicaStore) -> None:
    store.apply(msg(0, [(1, add(1))]))
    # the message with 2..3 was lost; 4..5 (prev 3) must wait
    assert store.apply(msg(3, [(4, add(4)), (5, add(5))])) == Applied(1, gap=True)
    assert sorted(store.items("shop-1")) == [1]
    assert store.apply(msg(1, [(2, add(2)), (3, add(3)), (4, add(4)), (5, add(5))])) == Applied(5, applied=4)


def test_a_bad_record_is_refused_alone_and_never_blocks_its_stream(store: ReplicaStore) -> None:
    bad = add(2)
    bad["vector"] = "not base64!"
    done = store.apply(msg(0, [(1, add(1)), (2, bad), (3, {"op": "add", "key": 3}), (4, add(4))]))
    assert done.last == 4 and done.applied == 2 and [o for o, _ in done.rejected] == [2, 3]
    assert "base64" in done.rejected[0][1]
    assert sorted(store.items("shop-1")) == [1, 4]
    # offsets that do not grow: the whole message is invalid and nothing of it stays
    with pytest.raises(ValueError, match="offsets must grow"):
        store.apply(msg(4, [(6, add(6)), (6, add(6))]))
    assert store.last("shop-1", "ltm") == 4 and sorted(store.items("shop-1")) == [1, 4]


def test_log_summaries_are_kept_per_site(store: ReplicaStore) -> None:
    s1 = {"from_offset": 0, "to_offset": 10, "entries": 10, "by_kind": {"event": 10}, "by_topic": {}}
    s2 = {"from_offset": 10, "to_offset": 12, "entries": 2, "by_kind": {"score": 2}, "by_topic": {}}
    store.apply(msg(0, [(1, s1), (2, s2)], stream="log"))
    assert [s["to_offset"] for s in store.summaries("shop-1")] == [10, 12]
    assert store.last("shop-1", "log") == 2 and store.last("shop-1", "ltm") == 0


@pytest.mark.parametrize(
    "doc",
    [
        {"v": 2, "id": "x", "site": "shop-1", "epoch": "e", "stream": "ltm", "prev": 0, "records": [[1, {}]]},
        {"v": 1, "id": "x", "site": "shop-1", "stream": "ltm", "prev": 0, "records": [[1, {}]]},  # no epoch
        {"v": 1, "id": "x", "site": "shop/1", "epoch": "e", "stream": "ltm", "prev": 0, "records": [[1, {}]]},
        {
            "v": 1,
            "id": "x",
            "site": "shop-1",
            "epoch": "e",
            "stream": "secrets",
            "prev": 0,
            "records": [[1, {}]],
        },
        {
            "v": 1,
            "id": "x",
            "site": "shop-1",
            "epoch": "e",
            "stream": "ltm",
            "prev": -1,
            "records": [[1, {}]],
        },
        {"v": 1, "id": "x", "site": "shop-1", "epoch": "e", "stream": "ltm", "prev": 0, "records": []},
        {
            "v": 1,
            "id": "x",
            "site": "shop-1",
            "epoch": "e",
            "stream": "ltm",
            "prev": 0,
            "records": [["1", {}]],
        },
        {
            "v": 1,
            "id": "x",
            "site": "shop-1",
            "epoch": "e",
            "stream": "ltm",
            "prev": 0,
            "records": [[1, {}]] * 10_001,
        },
    ],
)
def test_malformed_messages_are_refused(doc: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        SyncMessage.model_validate(doc)
