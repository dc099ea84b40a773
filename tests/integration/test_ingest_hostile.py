"""Hostile input against a real Mosquitto and a running ingest.

For every kind of bad input: ingest keeps running (a good reading sent afterwards still comes out as
an event), the bad input is dead-lettered on ``.../dlq/ingest`` with the right ``reason`` and its
original bytes (``payload_b64``), and the counter ``rejected.<reason>`` rises in the metrics ingest
publishes on ``.../metrics/ingest``.
"""

from __future__ import annotations

import base64
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from outpost.broker import Mosquitto
from outpost.bus import Bus
from outpost.contracts import DLQ_PAYLOAD_MAX, DeadLetter, Event, reading_id
from outpost.services.registry import OutpostSettings
from tests.conftest import Collector, RunningIngest, make_reading

pytestmark = pytest.mark.integration

WAIT = 30.0  # generous: machines are noisy; a passing test never waits this long


@dataclass
class Rig:
    settings: OutpostSettings
    pub: Bus
    events: Collector
    dlq: Collector
    metrics: Collector
    ingest: RunningIngest
    alive_checks: int = field(default=0)

    @property
    def site(self) -> str:
        return self.settings.site

    def topic(self, device: str) -> str:
        return self.settings.topics.telemetry(device)

    def send(self, device: str, payload: Any, *, topic: str | None = None) -> bytes:
        """Publish at QoS 1 and return the exact bytes sent."""
        raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        self.pub.publish(topic or self.topic(device), raw, qos=1)
        return raw

    # --- what came out ---------------------------------------------------------------------------
    def dead_letters(self, reason: str | None = None) -> list[dict[str, Any]]:
        return [d for d in self.dlq.json() if reason is None or d["reason"] == reason]

    def wait_dead_letters(self, reason: str, n: int = 1) -> list[dict[str, Any]]:
        ok = self.dlq.wait_for(lambda _c: len(self.dead_letters(reason)) >= n, WAIT)
        got = self.dead_letters(reason)
        assert ok, f"expected {n} dead letters {reason!r}, got {len(got)}; all: {self.reasons()}"
        return got

    def reasons(self) -> list[str]:
        return [d["reason"] for d in self.dlq.json()]

    def events_of(self, device: str) -> list[dict[str, Any]]:
        return [e for e in self.events.events() if e["device"] == device]

    def wait_events(self, device: str, n: int) -> list[dict[str, Any]]:
        ok = self.events.wait_for(lambda _c: len(self.events_of(device)) >= n, WAIT)
        got = self.events_of(device)
        assert ok, f"expected {n} events from {device}, got {len(got)}; dead letters: {self.reasons()}"
        return got

    def counter(self, name: str) -> int:
        """The highest value the counter reached in any published metrics snapshot."""
        return max((m["counters"].get(name, 0) for m in self.metrics.json()), default=0)

    def wait_counter(self, name: str, at_least: int) -> None:
        ok = self.metrics.wait_for(lambda _c: self.counter(name) >= at_least, WAIT)
        assert ok, f"metric {name} stayed at {self.counter(name)}, expected >= {at_least}"

    def assert_alive(self) -> None:
        """A good reading from a fresh device still comes out as an event."""
        self.alive_checks += 1
        device = f"alive-{self.alive_checks}"
        self.send(device, make_reading(device, 0))
        [event] = self.wait_events(device, 1)
        Event.model_validate(event)
        assert self.ingest.thread.is_alive()

    def assert_rejected(
        self,
        reason: str,
        raw: bytes,
        *,
        n: int = 1,
        topic: str | None = None,
        no_events_from: str | None = None,
    ) -> list[dict[str, Any]]:
        """The full check: ``n`` dead letters with ``reason`` holding ``raw``, the counter, and that
        ingest still works afterwards (and produced no event from the bad device)."""
        entries = self.wait_dead_letters(reason, n)
        for entry in entries:
            DeadLetter.model_validate(entry)
            assert entry["stage"] == "ingest"
            assert entry["payload_len"] == len(raw)
            assert entry["truncated"] is (len(raw) > DLQ_PAYLOAD_MAX)
            assert base64.b64decode(entry["payload_b64"]) == raw[:DLQ_PAYLOAD_MAX]
            assert entry["detail"]
            if topic is not None:
                assert entry["topic"] == topic
        self.wait_counter(f"rejected.{reason}", n)
        self.wait_counter("rejected", n)
        self.assert_alive()
        if no_events_from is not None:
            assert self.events_of(no_events_from) == []
        return entries


@pytest.fixture
def make_rig(
    settings: OutpostSettings,
    publisher: Bus,
    collect: Callable[..., Collector],
    start_ingest: Callable[[], RunningIngest],
) -> Iterator[Callable[..., Rig]]:
    def make(**ingest_settings: Any) -> Rig:
        for name, value in ingest_settings.items():
            setattr(settings.ingest, name, value)
        settings.telemetry.metrics_interval_s = 0.1  # counters show up quickly
        t = settings.topics
        events = collect(t.all_events)
        dlq = collect(t.dlq("ingest"))
        metrics = collect(t.metrics("ingest"))
        ingest = start_ingest()  # after the collectors: they are subscribed before any output
        return Rig(settings, publisher, events, dlq, metrics, ingest)

    yield make


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    return make_rig()


# --- whole-message problems -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"hello, ingest",
        b"{",
        b"[{",
        b'{"device": "d1", "seq": ',
        b"{'device': 'd1'}",
        b'{"device":"bad1"} trailing',
        b"[" * 10_000,
    ],
    ids=["text", "open-brace", "cut-batch", "cut-object", "single-quotes", "trailing", "deep"],
)
def test_not_json(rig: Rig, raw: bytes) -> None:
    rig.send("bad1", raw)
    rig.assert_rejected("not_json", raw, topic=rig.topic("bad1"))


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe\xfd",
        b'{"device":"bad1","seq":1,"ts":1,"metric":"t\xe9mp","value":1,"unit":"C"}',
        b"\x80" + orjson.dumps(make_reading("bad1", 1)),
    ],
    ids=["garbage", "latin1-in-json", "leading-continuation-byte"],
)
def test_not_utf8(rig: Rig, raw: bytes) -> None:
    rig.send("bad1", raw)
    rig.assert_rejected("not_utf8", raw, no_events_from="bad1")


@pytest.mark.parametrize("raw", [b"42", b'"a string"', b"null", b"true", b"-1.5e3"])
def test_wrong_shape_scalar(rig: Rig, raw: bytes) -> None:
    rig.send("bad1", raw)
    [entry] = rig.assert_rejected("wrong_shape", raw)
    assert entry["index"] is None


def test_wrong_shape_list_of_numbers(rig: Rig) -> None:
    raw = rig.send("bad1", b"[1, 2, 3]")
    entries = rig.wait_dead_letters("wrong_shape", 3)
    assert sorted(e["index"] for e in entries) == [0, 1, 2]
    for e in entries:  # each item dead-lettered on its own, with the item as its payload
        assert orjson.loads(base64.b64decode(e["payload_b64"])) == e["index"] + 1
        assert e["topic"] == rig.topic("bad1")
    rig.wait_counter("rejected.wrong_shape", 3)
    rig.assert_alive()
    assert raw == b"[1, 2, 3]"


def test_empty_batch(rig: Rig) -> None:
    raw = rig.send("bad1", b"[]")
    rig.assert_rejected("empty_batch", raw)


# --- one reading with a bad field ------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["device", "seq", "ts", "metric", "value", "unit"])
def test_missing_field(rig: Rig, missing: str) -> None:
    reading = make_reading("bad1", 1)
    del reading[missing]
    raw = rig.send("bad1", reading)
    rig.assert_rejected("missing_field", raw, no_events_from="bad1")


def test_extra_field(rig: Rig) -> None:
    raw = rig.send("bad1", make_reading("bad1", 1, firmware="1.2.3"))
    rig.assert_rejected("extra_field", raw, no_events_from="bad1")


@pytest.mark.parametrize(
    "bad",
    [
        {"seq": "1"},
        {"seq": True},
        {"seq": 1.5},
        {"ts": float(time.time_ns())},
        {"ts": "2026-01-01T00:00:00Z"},
        {"value": True},
        {"value": "21.5"},
        {"value": None},
        {"device": 7},
        {"unit": ["C"]},
    ],
    ids=lambda b: "-".join(f"{k}={type(v).__name__}" for k, v in b.items()),
)
def test_wrong_type(rig: Rig, bad: dict[str, Any]) -> None:
    raw = rig.send("bad1", make_reading("bad1", 1, **bad))
    rig.assert_rejected("wrong_type", raw, no_events_from="bad1")


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"])
def test_not_finite(rig: Rig, token: bytes) -> None:
    raw = orjson.dumps(make_reading("bad1", 1, value=12.25)).replace(b"12.25", token)
    assert token in raw
    rig.send("bad1", raw)
    rig.assert_rejected("not_finite", raw, no_events_from="bad1")


@pytest.mark.parametrize(
    ("value", "unit"), [(1e308, "kW"), (-1e308, "kWh"), (1.7e308, "ratio"), (1e308, "in/s")]
)
def test_finite_value_overflowing_on_conversion(rig: Rig, value: float, unit: str) -> None:
    """A finite value that overflows to infinity when converted to its canonical unit must not come
    out as an event (orjson would write the infinity as null)."""
    raw = rig.send("bad1", make_reading("bad1", 1, value=value, unit=unit))
    rig.assert_rejected("out_of_range", raw, no_events_from="bad1")


@pytest.mark.parametrize(
    "bad",
    [{"seq": -1}, {"ts": -1}],
    ids=["negative-seq", "negative-ts"],
)
def test_out_of_range(rig: Rig, bad: dict[str, Any]) -> None:
    raw = rig.send("bad1", make_reading("bad1", 1, **bad))
    rig.assert_rejected("out_of_range", raw, no_events_from="bad1")


def test_seq_beyond_64_bits(rig: Rig) -> None:
    raw = orjson.dumps(make_reading("bad1", 7)).replace(b'"seq":7', b'"seq":99999999999999999999999')
    rig.send("bad1", raw)
    rig.assert_rejected("out_of_range", raw, no_events_from="bad1")


def test_bad_identifier_in_payload(rig: Rig) -> None:
    raw = rig.send("bad1", make_reading("bad1", 1, metric="temp/erature"))
    rig.assert_rejected("bad_identifier", raw, no_events_from="bad1")


@pytest.mark.parametrize(
    ("offset_s", "reason"),
    [
        (86_400.0, "ts_future"),
        (10 * 365 * 86_400.0, "ts_future"),
        (-30 * 86_400.0, "ts_past"),
        (-40 * 365 * 86_400.0, "ts_past"),
    ],
    ids=["1-day-ahead", "10-years-ahead", "30-days-old", "40-years-old"],
)
def test_timestamps_far_off(rig: Rig, offset_s: float, reason: str) -> None:
    ts = time.time_ns() + int(offset_s * 1e9)
    raw = rig.send("bad1", make_reading("bad1", 1, ts=ts))
    rig.assert_rejected(reason, raw, no_events_from="bad1")


@pytest.mark.parametrize(("factor", "unit", "times"), [(1, "seconds", "1e9"), (1000, "milliseconds", "1e6")])
def test_timestamp_in_seconds_instead_of_ns(rig: Rig, factor: int, unit: str, times: str) -> None:
    raw = rig.send("bad1", make_reading("bad1", 1, ts=int(time.time()) * factor))
    [entry] = rig.assert_rejected("ts_past", raw, no_events_from="bad1")
    assert "nanoseconds" in entry["detail"]
    assert f"looks like {unit}: multiply by {times}" in entry["detail"]


@pytest.mark.parametrize("unit", ["furlong", "celsius", "c", "°K"])
def test_unknown_unit(rig: Rig, unit: str) -> None:
    raw = rig.send("bad1", make_reading("bad1", 1, unit=unit))
    rig.assert_rejected("unknown_unit", raw, no_events_from="bad1")


def test_duplicate_key(rig: Rig) -> None:
    raw = b'{"device": "bad1", "seq": 1, "ts": %d, "metric": "m", "value": 1.0, "value": 99.0, "unit": "C"}'
    raw = raw % time.time_ns()
    rig.send("bad1", raw)
    [entry] = rig.assert_rejected("duplicate_key", raw, no_events_from="bad1")
    assert "'value'" in entry["detail"]


def test_duplicate_key_in_a_batch_refuses_that_reading_alone(rig: Rig) -> None:
    good = [make_reading("dk", s) for s in range(3)]
    bad = orjson.dumps(make_reading("dk", 3))[:-1] + b',"seq":4}'
    raw = b"[" + b",".join([*map(orjson.dumps, good), bad]) + b"]"
    rig.send("dk", raw)
    [entry] = rig.wait_dead_letters("duplicate_key")
    assert entry["index"] == 3
    assert sorted(e["seq"] for e in rig.wait_events("dk", 3)) == [0, 1, 2]


def test_escaped_quotes_are_not_a_duplicate_key(rig: Rig) -> None:
    """The cheap check counts quotes; an escaped one in a unit sends it to the full check, which
    finds nothing: the reading is judged on its unit as usual."""
    raw = rig.send("q1", make_reading("q1", 1, unit='in"'))
    rig.assert_rejected("unknown_unit", raw)


def test_device_mismatch(rig: Rig) -> None:
    raw = rig.send("bad1", make_reading("someone-else", 1))
    rig.assert_rejected("device_mismatch", raw, topic=rig.topic("bad1"), no_events_from="someone-else")
    assert rig.events_of("bad1") == []


# --- the topic's device level ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device",
    ["x" * 65, "x" * 300, "dev*1", "dev.1", "*", "dév", "dev 1", "$dev"],
    ids=["65-chars", "300-chars", "star", "dot", "star-only", "non-ascii", "space", "dollar"],
)
def test_bad_device_segment_in_topic(rig: Rig, device: str) -> None:
    topic = f"{rig.settings.topics.root}/dev/{device}/telemetry"
    raw = rig.send("", make_reading("dev1", 1), topic=topic)
    entries = rig.assert_rejected("bad_topic", raw, topic=topic[:512], no_events_from="dev1")
    assert device[:64] in entries[0]["detail"]


@pytest.mark.parametrize("device", ["a/b", "a/b/c", "shop/fridge-1"])
def test_device_id_with_a_slash(rig: Rig, device: str) -> None:
    """A telemetry topic with extra levels used to match no subscription and vanish."""
    topic = f"{rig.settings.topics.root}/dev/{device}/telemetry"
    raw = rig.send("", make_reading("a", 1), topic=topic)
    [entry] = rig.assert_rejected("bad_topic", raw, topic=topic)
    assert "levels" in entry["detail"]


def test_other_device_topics_are_not_telemetry(rig: Rig) -> None:
    """ingest reads everything under dev/ (so bad telemetry topics arrive): a device's status and
    commands are not readings, and are neither taken nor dead-lettered, only counted."""
    t = rig.settings.topics
    rig.send("", b'{"state": "online"}', topic=t.device_status("d1"))
    rig.send("", b'{"open": true}', topic=t.device_cmd("d1", "door"))
    rig.wait_counter("ignored", 2)
    rig.assert_alive()
    assert rig.dead_letters() == []


def test_empty_payload_is_counted_not_dead_lettered(rig: Rig) -> None:
    """An empty message is what clearing a retained message delivers: no reading, no dead letter."""
    rig.send("d1", b"")
    rig.wait_counter("empty_ignored", 1)
    rig.assert_alive()
    assert rig.dead_letters() == []


def _mqtt_string(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def _mqtt_packet(kind: int, body: bytes) -> bytes:
    n, length = len(body), b""
    while True:
        n, digit = divmod(n, 128)
        length += bytes([digit | (0x80 if n else 0)])
        if not n:
            return bytes([kind]) + length + body


def _raw_publish(port: int, topic: bytes, payload: bytes) -> bool:
    """Connect with MQTT 3.1.1 over a plain socket (paho refuses such topics itself), publish at QoS 0
    and return whether the broker closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        connect = _mqtt_string(b"MQTT") + bytes([4, 0x02]) + struct.pack("!H", 30)
        s.sendall(_mqtt_packet(0x10, connect + _mqtt_string(b"raw-" + str(time.time_ns()).encode())))
        assert s.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
        s.sendall(_mqtt_packet(0x30, _mqtt_string(topic) + payload))
        s.settimeout(10)
        try:
            return s.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


@pytest.mark.parametrize("device", [b"+", b"#", b"a\x00b", b"\xff"], ids=["plus", "hash", "nul", "bad-utf8"])
def test_broker_disconnects_publisher_of_illegal_topic(rig: Rig, broker: Mosquitto, device: bytes) -> None:
    topic = rig.settings.topics.root.encode() + b"/dev/" + device + b"/telemetry"
    assert _raw_publish(broker.port, topic, orjson.dumps(make_reading("dev1", 1)))
    rig.assert_alive()
    assert rig.dlq.json() == []
    assert rig.events_of("dev1") == []


# --- what is counted ---------------------------------------------------------------------------------


def test_accepted_readings_are_counted_per_device_class(rig: Rig) -> None:
    """``readings.{device_class}`` counts readings turned into events, per class of device: a
    refused reading and a duplicate are not in it; ``readings`` counts them all."""
    batch = [make_reading("fridge-001", seq) for seq in range(6)]
    batch[2]["unit"] = "furlong"  # refused alone: five of six accepted
    rig.send("fridge-001", batch)
    rig.send("fridge-012", [make_reading("fridge-012", seq) for seq in range(3)])
    rig.send("gateway", make_reading("gateway", 1))  # no trailing number: its own class
    rig.wait_events("fridge-001", 5)
    rig.wait_events("fridge-012", 3)
    rig.wait_events("gateway", 1)
    raw = rig.send("fridge-012", make_reading("fridge-012", 1))  # a duplicate
    rig.assert_rejected("duplicate", raw)  # then a fresh device alive-1 is accepted
    rig.wait_counter("readings.alive", 1)
    last = rig.metrics.json()[-1]["counters"]
    assert {k: v for k, v in last.items() if k.startswith("readings.")} == {
        "readings.fridge": 8,
        "readings.gateway": 1,
        "readings.alive": 1,
    }
    assert last["readings"] == 12


# --- seq handling ------------------------------------------------------------------------------------


def test_duplicate_seq(rig: Rig) -> None:
    first = make_reading("dev1", 7)
    rig.send("dev1", first)
    [event] = rig.wait_events("dev1", 1)
    raw = rig.send("dev1", first)  # the very same reading again
    [entry] = rig.assert_rejected("duplicate", raw)
    assert entry["trace"] == event["id"] == reading_id(rig.site, "dev1", 7)
    assert len(rig.events_of("dev1")) == 1


def test_out_of_order(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(dedup_window=64)
    base = time.time_ns() - 60 * 10**9
    readings = {seq: make_reading("dev1", seq, ts=base + seq * 10**6) for seq in (1, 2, 3, 4, 5, 200)}
    for seq in (1, 2, 5, 3, 4):
        rig.send("dev1", readings[seq])
    events = {e["seq"]: e for e in rig.wait_events("dev1", 5)}
    assert sorted(events) == [1, 2, 3, 4, 5]
    assert events[5]["gap"] == 2
    assert events[3]["late"] is True
    assert events[4]["late"] is True
    assert not any(events[s]["late"] for s in (1, 2, 5))
    rig.wait_counter("late", 2)
    rig.wait_counter("gaps", 1)

    # a replay of a seq inside the window is a duplicate ...
    raw = rig.send("dev1", readings[3])
    rig.assert_rejected("duplicate", raw)
    # ... and one older than the window, with its old timestamp, cannot be proven new
    rig.send("dev1", readings[200])
    rig.wait_events("dev1", 6)
    raw = rig.send("dev1", readings[2])
    rig.assert_rejected("stale_seq", raw)
    assert sorted(e["seq"] for e in rig.events_of("dev1")) == [1, 2, 3, 4, 5, 200]


def test_device_restarting_its_counter_is_not_a_duplicate(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(dedup_window=64)
    base = time.time_ns() - 60 * 10**9
    rig.send("dev1", [make_reading("dev1", seq, ts=base + seq) for seq in range(100)])
    rig.wait_events("dev1", 100)
    later = base + 10 * 10**9
    for seq in range(3):  # rebooted: counts from 0 again, with newer timestamps
        rig.send("dev1", make_reading("dev1", seq, ts=later + seq))
    events = rig.wait_events("dev1", 103)
    assert len(events) == 103
    # the restarted counter's readings get new ids: consumers that drop copies by id keep them
    assert len({e["id"] for e in events}) == 103
    assert {e["id"] for e in events if e["ts"] >= later} == {
        reading_id(rig.site, "dev1", seq, epoch=1) for seq in range(3)
    }
    rig.wait_counter("seq_resets", 1)
    assert rig.dead_letters() == []


# --- sizes -------------------------------------------------------------------------------------------


def test_payload_over_size_limit(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(max_payload_bytes=256)
    batch = [make_reading("dev1", seq) for seq in range(4)]
    raw = rig.send("dev1", batch)
    assert len(raw) > 256
    [entry] = rig.assert_rejected("too_large", raw, no_events_from="dev1")
    assert entry["truncated"] is False
    # a reading under the limit from the same device still goes through
    rig.send("dev1", make_reading("dev1", 10))
    rig.wait_events("dev1", 1)


def test_batch_of_10000(rig: Rig) -> None:
    base = time.time_ns()
    batch = [make_reading("big", seq, ts=base + seq, value=float(seq)) for seq in range(10_000)]
    rig.send("big", batch)
    events = rig.wait_events("big", 10_000)
    assert sorted(e["seq"] for e in events) == list(range(10_000))
    assert all(e["value"] == float(e["seq"]) for e in events)
    assert len({e["id"] for e in events}) == 10_000
    rig.wait_counter("events", 10_000)
    assert rig.dead_letters() == []
    rig.assert_alive()


def test_batch_of_10001(rig: Rig) -> None:
    batch = [make_reading("big", seq) for seq in range(10_001)]
    raw = rig.send("big", batch)
    [entry] = rig.assert_rejected("batch_too_large", raw, no_events_from="big")
    assert entry["truncated"] is True  # over 64 KiB: the first 64 KiB are kept


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"firmware": "1.2"}, "extra_field"),
        ({"seq": "2"}, "wrong_type"),
        ({"unit": "furlong"}, "unknown_unit"),
        ({"device": "other"}, "device_mismatch"),
        ({"ts": time.time_ns() + 10**15}, "ts_future"),
        ({"value": 1e308, "unit": "kW"}, "out_of_range"),
    ],
)
def test_batch_with_one_bad_reading(rig: Rig, bad: dict[str, Any], reason: str) -> None:
    batch = [make_reading("dev1", seq) for seq in range(6)]
    batch[2].update(bad)
    raw = rig.send("dev1", batch)
    events = rig.wait_events("dev1", 5)
    [entry] = rig.wait_dead_letters(reason)
    assert entry["index"] == 2
    assert orjson.loads(base64.b64decode(entry["payload_b64"])) == batch[2]
    assert entry["topic"] == rig.topic("dev1")
    rig.wait_counter(f"rejected.{reason}", 1)
    rig.assert_alive()
    assert sorted(e["seq"] for e in events) == [0, 1, 3, 4, 5]
    assert len(raw) > entry["payload_len"]


def test_batch_with_a_nan_among_good_readings(rig: Rig) -> None:
    batch = [make_reading("dev1", seq, value=1.25) for seq in range(4)]
    items = [orjson.dumps(r) for r in batch]
    items[1] = items[1].replace(b"1.25", b"NaN")
    rig.send("dev1", b"[" + b",".join(items) + b"]")
    events = rig.wait_events("dev1", 3)
    [entry] = rig.wait_dead_letters("not_finite")
    assert entry["index"] == 1
    assert base64.b64decode(entry["payload_b64"]) == items[1].replace(b" ", b"")
    rig.wait_counter("rejected.not_finite", 1)
    rig.assert_alive()
    assert sorted(e["seq"] for e in events) == [0, 2, 3]


def test_batch_with_a_duplicate_inside(rig: Rig) -> None:
    batch = [make_reading("dev1", seq) for seq in range(4)]
    batch.insert(3, dict(batch[1]))  # the same reading twice in one batch
    rig.send("dev1", batch)
    events = rig.wait_events("dev1", 4)
    [entry] = rig.wait_dead_letters("duplicate")
    assert entry["index"] == 3
    assert orjson.loads(base64.b64decode(entry["payload_b64"])) == batch[3]
    rig.wait_counter("rejected.duplicate", 1)
    rig.assert_alive()
    assert sorted(e["seq"] for e in events) == [0, 1, 2, 3]


# --- huge bad batches -------------------------------------------------------------------------------


def test_batch_of_300000_empty_objects_is_one_dead_letter(rig: Rig) -> None:
    """900 KB of `{}`: refused whole as batch_too_large, one dead letter (the decoder used to
    build an error for every field of every item first: 1.4 s with every device waiting)."""
    raw = b"[" + b",".join([b"{}"] * 300_000) + b"]"
    rig.send("big", raw)
    [entry] = rig.assert_rejected("batch_too_large", raw)
    assert "300000 items" in entry["detail"]
    assert rig.counter("rejected") == 1


def test_batch_of_10000_bad_readings_is_grouped(rig: Rig) -> None:
    """10,000 bad readings make 10 dead letters of one reading each and one group for the rest,
    with the per-item reasons listed (bounded), and counters that agree with the counts."""
    batch = [make_reading("big", seq, device="not ok") for seq in range(10_000)]
    raw = rig.send("big", batch)
    entries = rig.wait_dead_letters("bad_identifier", 11)
    rig.wait_counter("rejected.bad_identifier", 10_000)
    time.sleep(0.5)  # nothing more comes
    entries = rig.dead_letters("bad_identifier")
    assert len(entries) == 11
    singles = [e for e in entries if e.get("count", 1) == 1]
    [group] = [e for e in entries if e.get("count", 1) > 1]
    assert sorted(e["index"] for e in singles) == list(range(10))
    assert group["count"] == 9_990
    assert group["index"] == 10
    assert [i["index"] for i in group["items"]] == list(range(10, 110))
    assert all("device" in i["detail"] for i in group["items"])
    DeadLetter.model_validate(group)
    listed = orjson.loads(base64.b64decode(group["payload_b64"]))
    assert listed == batch[10 : 10 + len(listed)]
    assert group["truncated"] is True  # 9,990 readings do not fit 64 KiB
    assert sum(e.get("count", 1) for e in entries) == 10_000
    assert len(raw) > 500_000
    rig.assert_alive()


def test_mixed_reasons_are_grouped_per_reason(rig: Rig) -> None:
    batch: list[Any] = [make_reading("mix", s) for s in range(5)]
    batch += [make_reading("mix", 100 + s, unit="furlong") for s in range(30)]
    batch += [make_reading("mix", 200 + s, value="x") for s in range(30)]
    rig.send("mix", batch)
    rig.wait_events("mix", 5)
    rig.wait_counter("rejected.unknown_unit", 30)
    rig.wait_counter("rejected.wrong_type", 30)

    def total(reason: str) -> int:
        return sum(e.get("count", 1) for e in rig.dead_letters(reason))

    assert rig.dlq.wait_for(lambda _c: total("unknown_unit") == 30 and total("wrong_type") == 30, WAIT)
    # the decoder's 30 wrong_type come first: 10 one by one, 20 grouped; all 30 unknown_unit grouped
    assert len(rig.dead_letters("wrong_type")) == 11
    assert len(rig.dead_letters("unknown_unit")) == 1


# --- flooding ----------------------------------------------------------------------------------------


def test_flooding_device_is_rate_limited_then_quarantined(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(rate_per_device=2.0, burst_per_device=10.0, quarantine_after=10, quarantine_s=300.0)
    flood = 100
    sent = {seq: rig.send("flood", make_reading("flood", seq)) for seq in range(flood)}
    for seq in range(5):  # a well-behaved neighbour, inside its own budget
        rig.send("calm", make_reading("calm", seq))
    calm = rig.wait_events("calm", 5)
    assert sorted(e["seq"] for e in calm) == list(range(5))

    rig.wait_dead_letters("rate_limited", 1)
    rig.wait_dead_letters("quarantined", 1)

    def counted(reason: str) -> int:  # a quarantined device's messages are dead-lettered in aggregate
        return sum(d.get("count", 1) for d in rig.dead_letters(reason))

    def accounted(_c: Collector) -> bool:
        n = len(rig.events_of("flood")) + counted("rate_limited")
        return n + counted("quarantined") >= flood

    assert rig.dlq.wait_for(accounted, WAIT), "every flooding reading is an event or a dead letter"
    limited = rig.dead_letters("rate_limited")
    quarantined = rig.dead_letters("quarantined")
    events = rig.events_of("flood")
    assert len(events) + counted("rate_limited") + counted("quarantined") == flood
    assert len(events) >= 10  # the burst
    assert len(limited) >= 1
    assert len(quarantined) >= 1
    assert len(quarantined) < counted("quarantined")  # aggregated, not one per message
    for entry in limited + quarantined:
        assert entry["topic"] == rig.topic("flood")
        assert base64.b64decode(entry["payload_b64"]) in sent.values()
    rig.wait_counter("rejected.rate_limited", counted("rate_limited"))
    rig.wait_counter("rejected.quarantined", counted("quarantined"))
    # still quarantined: a new reading is refused, the neighbour still flows
    raw = rig.send("flood", make_reading("flood", 1000))
    rig.wait_dead_letters("quarantined", len(quarantined) + 1)
    rig.send("calm", make_reading("calm", 5))
    rig.wait_events("calm", 6)
    assert raw in [base64.b64decode(e["payload_b64"]) for e in rig.dead_letters("quarantined")]
    rig.assert_alive()
