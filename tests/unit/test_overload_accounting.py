"""The overload benchmark's accounting rules and its bad-batch generator (pure logic): what one dead
letter stands for, what counts as shed, and that a junk batch is the size asked for and refused item
by item by ingest's contract."""

from __future__ import annotations

import time

import orjson
import pytest
from pydantic import TypeAdapter, ValidationError

from outpost.benchmarks.load import JunkBatch, _packet
from outpost.benchmarks.sinks import dead_letter_items, shed_counted
from outpost.contracts import DeadLetter, ReadingDict


def test_a_dead_letter_stands_for_one_item_or_the_whole_message() -> None:
    assert dead_letter_items({"reason": "wrong_type", "index": 3}, per_msg=10_000) == 1
    assert dead_letter_items({"reason": "wrong_type", "index": 0, "count": 1}, per_msg=10_000) == 1
    assert dead_letter_items({"reason": "too_large", "index": None}, per_msg=10_000) == 10_000
    assert dead_letter_items({"reason": "rate_limited"}, per_msg=1) == 1


def test_an_aggregated_dead_letter_stands_for_its_count() -> None:
    # a group of a batch's bad items: count items (items lists the first 100 of them)
    group = {"reason": "wrong_type", "index": None, "count": 9_990, "items": [{"index": 10}]}
    assert dead_letter_items(group, per_msg=10_000) == 9_990
    # messages shed unread: count messages, each a whole one
    assert dead_letter_items({"reason": "quarantined", "index": None, "count": 2_500}, per_msg=1) == 2_500
    assert dead_letter_items({"reason": "overloaded", "count": 3}, per_msg=4) == 12
    assert dead_letter_items({"reason": "shed", "count": True}, per_msg=7) == 7  # not a count


def test_the_dead_letter_contract_says_how_many_inputs_an_entry_stands_for() -> None:
    assert {"count", "items", "index"} <= set(DeadLetter.model_fields)
    assert DeadLetter.model_fields["count"].default == 1


def test_shed_is_the_total_or_the_sum_of_its_parts() -> None:
    assert shed_counted({"rejected": 5, "shed": 40, "shed.flood": 30, "shed.queue": 10}) == (
        40,
        {"shed": 40, "shed.flood": 30, "shed.queue": 10},
    )
    assert shed_counted({"shed.flood": 30, "shed_queue": 12, "rejected.shed": 99})[0] == 42
    assert shed_counted({"rejected": 5}) == (0, {})


def test_a_junk_batch_is_about_the_size_asked_and_every_item_is_refused() -> None:
    junk = JunkBatch("s1", items=1000, size=100_000)
    first, second = junk.make(0, time.time_ns()), junk.make(0, time.time_ns())
    assert 0.95 * 100_000 <= len(second) <= 1.05 * 100_000
    items = orjson.loads(first) + orjson.loads(second)
    assert [i["seq"] for i in items] == list(range(2000))  # each item distinct: its own dead letter
    reading = TypeAdapter(ReadingDict)
    for item in items[:50]:
        with pytest.raises(ValidationError):
            reading.validate_python(item)
    assert junk.topics == ["outpost/v1/s1/dev/junk-00000/telemetry"]


def test_raw_packets_encode_the_remaining_length() -> None:
    assert _packet(0x30, b"x" * 5) == b"\x30\x05xxxxx"
    assert _packet(0x30, b"x" * 200)[:3] == b"\x30\xc8\x01"  # 200 = 0x48 + 1 * 128
    assert len(_packet(0x30, b"x" * 1_000_000)) == 1_000_000 + 4
