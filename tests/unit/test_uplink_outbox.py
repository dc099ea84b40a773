"""The uplink's pure parts: the outbox's offsets and disk-budget policy (oldest bulk first, never
alerts), a message's records and what is refused, the byte gate, the priority order."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from outpost.clouddb import CloudDbError
from outpost.service import Rejected
from outpost.services.uplink.outbox import STREAMS, Outbox, StreamSource, Taken, drop_order
from outpost.services.uplink.service import records_of
from outpost.services.uplink.store import CloudStore
from outpost.streams import ByteBucket


def take(stream: str, n: int, size: int = 100, made_ns: int = 1) -> list[Taken]:
    return [
        Taken(stream, f"{stream}/x", orjson.dumps({"id": f"{stream}{i}", "p": "x" * size}), made_ns)
        for i in range(n)
    ]


def test_priority_order_and_what_gives_way() -> None:
    assert STREAMS == ("alerts", "decisions", "actions", "memory", "metrics", "events")
    assert drop_order() == ("events", "metrics", "actions", "decisions")


def test_offsets_grow_per_stream_and_never_go_back(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.add([*take("events", 3), *take("alerts", 2)])
    assert (box.last("events"), box.last("alerts")) == (3, 2)
    box.trim("events", 3)
    box.add(take("events", 1))
    assert [o for o, _ in box.after("events", 0, 10)] == [4]
    box.close()
    again = Outbox(tmp_path / "o.db")  # from disk
    assert again.last("events") == 4 and again.count == 3
    assert again.after("alerts", 0, 10)[0][1]["body"]["id"] == "alerts0"
    again.close()


def test_the_budget_drops_the_oldest_of_the_lowest_priority_first(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.add([*take("alerts", 5), *take("decisions", 5), *take("metrics", 5), *take("events", 10)])
    events_bytes, metric_bytes = box.held()["events"][1], box.held()["metrics"][1] // 5
    dropped = box.enforce(box.bytes - events_bytes - 2 * metric_bytes)  # the events and 2 metrics over
    assert dropped == {"events": 10, "metrics": 2}
    assert [o for o, _ in box.after("metrics", 0, 10)] == [3, 4, 5]  # the oldest went
    assert box.enforce(0) == {"metrics": 3, "decisions": 5}
    assert box.held().keys() == {"alerts"}  # under a budget of 0, only alerts are left
    assert box.held()["alerts"][0] == 5
    box.close()


def test_alerts_never_expire(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.add([*take("alerts", 2, made_ns=1), *take("events", 2, made_ns=1)])
    assert StreamSource(box, "alerts").expire(10) == 0
    assert StreamSource(box, "events").expire(10) == 2
    assert StreamSource(box, "alerts").pending(0) == (2, 1)
    box.close()


def test_a_message_is_cut_by_bytes(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", message_bytes=1000)
    box.add(take("events", 20, size=400))
    assert len(box.after("events", 0, 100)) == 2
    box.add(take("metrics", 1, size=5000))
    assert len(box.after("metrics", 0, 100)) == 1  # a big record goes alone
    box.close()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"nope", "not_json"),
        (b"\xff", "not_json"),
        (b"[]", "wrong_shape"),
        (b"3", "wrong_shape"),
        (b'[{"id": "a"}, 2]', "wrong_shape"),
        (b'{"id": 5}', "wrong_shape"),
        (b'{"id": ""}', "wrong_shape"),
        (orjson.dumps({"id": "x" * 129}), "wrong_shape"),
    ],
)
def test_what_is_not_a_record_is_refused(raw: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as e:
        records_of(raw)
    assert e.value.reason == reason


def test_records_keep_their_bytes() -> None:
    raw = b'{"id": "a",  "n": 1}'
    assert records_of(raw) == [({"id": "a", "n": 1}, raw)]
    batch = records_of(b'[{"id": "a"}, {"id": "b"}]')
    assert [b for _, b in batch] == [b'{"id":"a"}', b'{"id":"b"}']


def test_the_byte_gate_holds_its_rate() -> None:
    gate = ByteBucket(1000, 250, now=0.0)
    sent, t = 0, 0.0
    while t < 10:
        if gate.ready(t):
            gate.spend(100)
            sent += 100
        t += 0.01
    assert 10_000 <= sent <= 10_000 + 250 + 100


def test_the_byte_gate_says_how_long_its_debt_lasts() -> None:
    gate = ByteBucket(1000, 250, now=0.0)
    assert gate.ready(0.0) and gate.wait_s() == 0.0
    gate.spend(750)  # 500 bytes in debt: half a second at 1,000 bytes/s
    assert not gate.ready(0.0)
    assert gate.wait_s() == pytest.approx(0.501)
    assert not gate.ready(0.25)
    assert gate.wait_s() == pytest.approx(0.251)
    assert gate.ready(0.501) and gate.wait_s() == 0.0
    assert ByteBucket(0, 0, now=0.0).wait_s() == float("inf")


@pytest.mark.parametrize(
    "url",
    ["mysql://u@h/db", "sqlite:/relative", "postgresql://u:s3cret@127.0.0.1:1/x", "sqlite:///{file}/x.db"],
)
def test_a_database_that_cannot_be_used_is_one_clear_error_without_its_password(
    url: str, tmp_path: Path
) -> None:
    file = tmp_path / "a-file"
    file.write_text("")
    with pytest.raises(CloudDbError) as e:
        CloudStore(url.format(file=file))
    assert "s3cret" not in str(e.value)
    assert "cannot use" in str(e.value) or "must be" in str(e.value)
