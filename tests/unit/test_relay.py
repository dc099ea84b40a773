"""The uplink's relay of memory sync's streams into its outbox, on a real SQLite outbox without a
broker: what follows the last record held becomes one outbox record (saying when it starts the
stream), a replay adds nothing, an outbox over its budget takes nothing, and forgetting the
streams tells memory to send them again from their start."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from outpost.contracts import StreamBatch
from outpost.service import ServiceRuntime
from outpost.services.uplink.outbox import Outbox, StreamSource
from outpost.services.uplink.relay import PART, Relay, Relayed
from outpost.streams import StoreUnavailableError
from outpost.topics import Topics


class FakeRuntime:
    def __init__(self) -> None:
        self.topics = Topics(site="shop-1")
        self.metrics = type("M", (), {"counters": Counter()})()
        self.subscribed: list[str] = []
        self.published: list[tuple[str, dict[str, Any]]] = []

    def subscribe(self, pattern: str, _handler: Any, **_: Any) -> None:
        self.subscribed.append(pattern)

    def publish(self, topic: str, payload: bytes, **_: Any) -> int:
        self.published.append((topic, orjson.loads(payload)))
        return 1


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Relay, Outbox, FakeRuntime, list[int]]:
    rt = FakeRuntime()
    box = Outbox(tmp_path / "outbox.db")
    afters: list[int] = []
    relay = Relay(cast(ServiceRuntime, rt), box, budget=1_000_000, after=lambda: afters.append(1))
    return relay, box, rt, afters


def msg(prev: int, offsets: range, *, stream: str = "ltm", epoch: str = "m1") -> StreamBatch:
    return StreamBatch.model_validate_json(
        orjson.dumps(
            {
                "v": 1,
                "id": "x",
                "site": "shop-1",
                "epoch": epoch,
                "stream": stream,
                "prev": prev,
                "records": [[o, {"n": o}] for o in offsets],
            }
        )
    )


def relayed(box: Outbox) -> list[Relayed]:
    return [Relayed.model_validate_json(orjson.dumps(r["body"])) for _, r in box.after(PART, 0, 1000)]


def test_what_is_new_becomes_one_outbox_record_and_a_replay_adds_nothing(
    parts: tuple[Relay, Outbox, FakeRuntime, list[int]],
) -> None:
    relay, box, rt, afters = parts
    assert rt.subscribed == [rt.topics.all_outbox("memory")]
    assert relay.apply(msg(0, range(1, 4))).last == 3
    assert relay.apply(msg(0, range(1, 4))).duplicates == 3  # memory resent it: nothing new
    done = relay.apply(msg(2, range(3, 6)))  # overlapping
    assert (done.last, done.applied, done.duplicates) == (5, 2, 1)
    relay.apply(msg(0, range(1, 3), stream="log"))
    got = relayed(box)
    assert [(r.stream, r.start, [o for o, _ in r.records]) for r in got] == [
        ("ltm", True, [1, 2, 3]),
        ("ltm", False, [4, 5]),
        ("log", True, [1, 2]),
    ]
    assert got[0].records[0] == (1, {"n": 1}) and got[0].epoch == "m1"
    assert box.count == 3 and len(afters) == 3
    assert rt.metrics.counters["uplink_taken.memory"] == 3


def test_a_new_epoch_starts_the_stream_and_history_it_never_had_is_unknown(
    parts: tuple[Relay, Outbox, FakeRuntime, list[int]],
) -> None:
    relay, box, _rt, _ = parts
    assert relay.apply(msg(40, range(41, 43))).unknown  # memory goes on from what the outbox never had
    assert box.count == 0
    relay.apply(msg(0, range(1, 3)))
    relay.apply(msg(0, range(1, 2), epoch="m2"))  # a wiped gateway's memory, say
    assert [(r.epoch, r.start) for r in relayed(box)] == [("m1", True), ("m2", True)]


def test_an_outbox_over_its_budget_takes_nothing_of_memorys(tmp_path: Path) -> None:
    rt = FakeRuntime()
    box = Outbox(tmp_path / "outbox.db")
    relay = Relay(cast(ServiceRuntime, rt), box, budget=100, after=lambda: None)
    relay.apply(msg(0, range(1, 30)))  # taken: the outbox was empty
    with pytest.raises(StoreUnavailableError, match="over its disk budget"):
        relay.apply(msg(29, range(30, 32)))
    assert box.last(PART) == 1 and rt.metrics.counters["relay_waits"] == 1
    assert relay.received.last("shop-1", "ltm") == 29  # nothing of the refused message was held


def test_forgetting_tells_memory_to_send_again_and_the_next_history_starts(
    parts: tuple[Relay, Outbox, FakeRuntime, list[int]],
) -> None:
    relay, box, rt, _ = parts
    relay.forget("nothing yet")  # a new outbox's first epoch: nothing to say
    assert rt.published == [] and rt.metrics.counters["relay_forgotten"] == 0
    relay.apply(msg(0, range(1, 4)))
    relay.apply(msg(0, range(1, 2), stream="log"))
    relay.forget("the cloud side lost the stream")
    assert box.count == 0 and relay.received.last("shop-1", "ltm") == 0
    said = sorted((t, d["stream"], d["offset"], d["epoch"], d["unknown"]) for t, d in rt.published)
    assert said == [
        (rt.topics.outbox_ack("memory", "log"), "log", 0, "m1", True),
        (rt.topics.outbox_ack("memory", "ltm"), "ltm", 0, "m1", True),
    ]
    assert relay.apply(msg(3, range(4, 5))).unknown  # a resend in flight meanwhile
    relay.apply(msg(0, range(10, 13)))  # memory's whole long-term memory again
    (again,) = relayed(box)
    assert again.start and [o for o, _ in again.records] == [10, 11, 12]


def test_memory_records_that_expire_in_the_outbox_are_forgotten(
    parts: tuple[Relay, Outbox, FakeRuntime, list[int]],
) -> None:
    relay, box, _rt, _ = parts
    relay.apply(msg(0, range(1, 4)))
    lost: list[str] = []
    src = StreamSource(box, PART, lost.append)
    assert src.expire(time.time_ns() - 10**12) == 0 and lost == []  # none that old
    assert src.expire(time.time_ns() + 10**9) == 1 and lost == ["expired"]
    assert src.snapshot() == 0 and lost == ["expired", "the cloud side lost the stream"]
