"""The replica on real SQLite, as the cloud side applies what the uplink relays: records apply in
order, a replay changes nothing, a record that starts the stream (or another epoch) replaces the
site's memory, and a bad record is refused alone."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from outpost.clouddb import sqlite_url
from outpost.services.memory.replica import ReplicaStore
from outpost.services.uplink.relay import Relayed
from outpost.store import transaction

Records = list[tuple[int, dict[str, Any]]]


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


@pytest.fixture
def store(tmp_path: Path) -> ReplicaStore:
    return ReplicaStore(sqlite_url(tmp_path / "replica.db"))


def relay(
    store: ReplicaStore,
    records: Records,
    *,
    start: bool = False,
    stream: str = "ltm",
    epoch: str = "e1",
    site: str = "shop-1",
) -> list[tuple[int, str]]:
    assert store._store is not None
    with transaction(store._store.db) as db:
        return store.apply_relayed(db, site, stream, epoch, start, records)


def test_records_apply_in_order_and_a_replay_changes_nothing(store: ReplicaStore) -> None:
    assert relay(store, [(1, add(1)), (2, add(2)), (4, add(4))], start=True) == []
    assert relay(store, [(5, {"op": "del", "key": 2}), (6, {"op": "gone", "key": 9})]) == []
    assert sorted(store.items("shop-1")) == [1, 4] and store.last("shop-1", "ltm") == 6
    # the same records again (sent twice on the way): nothing changes
    relay(store, [(1, add(1)), (2, add(2)), (4, add(4))])
    assert sorted(store.items("shop-1")) == [1, 4]
    # overlapping: the held part is skipped, the rest applies
    relay(store, [(5, {"op": "del", "key": 2}), (6, add(2)), (7, add(7))])
    assert sorted(store.items("shop-1")) == [1, 4, 7] and store.last("shop-1", "ltm") == 7
    assert store.items("other-site") == {}


def test_a_start_or_a_new_epoch_replaces_the_sites_memory(store: ReplicaStore) -> None:
    relay(store, [(1, add(1)), (2, add(2)), (3, add(3))], start=True)
    relay(store, [(1, {"from_offset": 0, "to_offset": 5, "entries": 5})], stream="log", start=True)
    relay(store, [(1, add(1))], site="shop-2", start=True)
    # the outbox forgot the stream and memory sent it whole again, at later offsets
    relay(store, [(10, add(2)), (11, add(3))], start=True)
    assert sorted(store.items("shop-1")) == [2, 3]
    # the gateway was wiped (or sync was off): a new epoch, its memory from the start again
    relay(store, [(1, add(7))], epoch="e2")
    assert sorted(store.items("shop-1")) == [7] and store.last("shop-1", "ltm") == 1
    relay(
        store, [(1, {"from_offset": 0, "to_offset": 2, "entries": 2})], stream="log", epoch="e2", start=True
    )
    assert [s["to_offset"] for s in store.summaries("shop-1")] == [2]  # the current history
    assert store.overview()["shop-1"]["summaries"] == 2  # the old one is kept
    assert sorted(store.items("shop-2")) == [1]  # another site is not touched


def test_a_bad_record_is_refused_alone_and_never_blocks_its_stream(store: ReplicaStore) -> None:
    bad = add(2)
    bad["vector"] = "not base64!"
    refused = relay(store, [(1, add(1)), (2, bad), (3, {"op": "add", "key": 3}), (4, add(4))], start=True)
    assert [o for o, _ in refused] == [2, 3] and "base64" in refused[0][1]
    assert sorted(store.items("shop-1")) == [1, 4] and store.last("shop-1", "ltm") == 4
    assert relay(store, [(5, add(5))], stream="secrets") == [(5, "not a stream of memory sync: 'secrets'")]


def test_log_summaries_are_kept_per_site(store: ReplicaStore) -> None:
    s1 = {"from_offset": 0, "to_offset": 10, "entries": 10, "by_kind": {"event": 10}, "by_topic": {}}
    s2 = {"from_offset": 10, "to_offset": 12, "entries": 2, "by_kind": {"score": 2}, "by_topic": {}}
    relay(store, [(1, s1), (2, s2)], stream="log", start=True)
    assert [s["to_offset"] for s in store.summaries("shop-1")] == [10, 12]
    assert store.last("shop-1", "log") == 2 and store.last("shop-1", "ltm") == 0


GOOD = {"id": "e1-ltm-1-1", "stream": "ltm", "epoch": "e1", "start": False, "records": [[1, {}]]}


@pytest.mark.parametrize(
    "change",
    [
        {"stream": "ltm/x"},
        {"epoch": ""},
        {"start": "yes"},
        {"records": []},
        {"records": [["1", {}]]},
        {"records": [[1, "not an object"]]},
        {"id": None},
        {"extra": 1},
    ],
)
def test_malformed_relayed_records_are_refused(change: dict[str, Any]) -> None:
    Relayed.model_validate_json(orjson.dumps(GOOD))  # as the cloud side reads it
    with pytest.raises(ValidationError):
        Relayed.model_validate_json(orjson.dumps({**GOOD, **change}))
