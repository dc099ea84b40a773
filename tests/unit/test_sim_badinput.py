"""Bad input: each kind is really invalid, with the DLQ reason ingest will give it, and the bad
ratio is honoured without changing the good readings."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from outpost.contracts import READING
from outpost.services.ingest.parse import parse
from outpost.services.ingest.seqtrack import Seen, SeqState, observe
from outpost.services.ingest.settings import IngestSettings
from outpost.services.ingest.units import UNITS
from outpost.sim import (
    ALL_KINDS,
    EXPECTED_REASON,
    MESSAGE_LEVEL,
    BadKind,
    DeviceStream,
    SimDevice,
    build_fleet,
    fleet_specs,
    make_bad,
)
from outpost.sim.badinput import Injector

NOW = 1_790_000_000 * 10**9
CFG = IngestSettings.model_validate({})


class MiniIngest:
    """Ingest's acceptance rules, applied without a broker: ``parse`` (READING validation), then
    the topic/device, timestamp, unit and seq checks the service makes, in the same order."""

    def __init__(self) -> None:
        self.seq: dict[str, SeqState] = {}
        self.accepted: list[dict[str, Any]] = []
        self.rejected: Counter[str] = Counter()

    def feed(self, topic_device: str, payload: bytes, now_ns: int = NOW) -> None:
        parsed = parse(payload, max_payload=CFG.max_payload_bytes, max_batch=CFG.max_batch)
        for rej in parsed.rejects:
            self.rejected[rej.reason] += 1
        for _, r in parsed.items:
            reason = self.check(topic_device, dict(r), now_ns)
            if reason is not None:
                self.rejected[reason] += 1
            else:
                self.accepted.append(dict(r))

    def check(self, topic_device: str, r: dict[str, Any], now_ns: int) -> str | None:
        if r["device"] != topic_device:
            return "device_mismatch"
        if r["ts"] > now_ns + int(CFG.max_future_s * 1e9):
            return "ts_future"
        if r["ts"] < now_ns - int(CFG.max_age_s * 1e9):
            return "ts_past"
        if r["unit"] not in UNITS:
            return "unknown_unit"
        outcome, _, state = observe(self.seq.get(topic_device), r["seq"], r["ts"], CFG.dedup_window)
        if outcome in (Seen.DUPLICATE, Seen.STALE):
            return "duplicate" if outcome is Seen.DUPLICATE else "stale_seq"
        self.seq[topic_device] = state
        return None


def _device(i: int = 1) -> SimDevice:
    return SimDevice(fleet_specs(10, "retail")[i], 11, start_ns=NOW)


@pytest.mark.parametrize("kind", ALL_KINDS, ids=str)
def test_every_bad_kind_is_rejected_with_its_expected_reason(kind: BadKind) -> None:
    rng = random.Random(str(kind))
    for i in range(10):
        for trial in range(40):
            device = _device(i)
            good = device.next_readings(NOW)
            last_good = orjson.dumps(good[-1])
            ingest = MiniIngest()
            for r in good:
                ingest.feed(device.id, orjson.dumps(r))
            assert not ingest.rejected
            data = make_bad(kind, device.template(NOW), rng, last_good=last_good)
            if kind not in MESSAGE_LEVEL and trial % 2:
                data = b"[" + data + b"]"  # inside a batch it must be rejected alone, the same way
            ingest.feed(device.id, data)
            assert ingest.rejected == {EXPECTED_REASON[kind]: 1}, (kind, data)
            assert len(ingest.accepted) == len(good)


@pytest.mark.parametrize(
    "kind",
    [
        k
        for k in ALL_KINDS
        if EXPECTED_REASON[k] not in ("device_mismatch", "ts_future", "ts_past", "unknown_unit", "duplicate")
    ],
    ids=str,
)
def test_malformed_kinds_fail_reading_validation(kind: BadKind) -> None:
    rng = random.Random(0)
    device = _device()
    device.next_readings(NOW)
    for _ in range(50):
        data = make_bad(kind, device.template(NOW), rng)
        with pytest.raises((ValidationError, ValueError)):
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise ValueError("not JSON") from exc
            READING.validate_python(doc)


@pytest.mark.parametrize("kind", ["device_mismatch", "ts_future", "ts_past", "unknown_unit"])
def test_well_formed_kinds_fail_the_topic_time_or_unit_check(kind: str) -> None:
    rng = random.Random(0)
    device = _device()
    device.next_readings(NOW)
    for _ in range(50):
        doc = orjson.loads(make_bad(BadKind(kind), device.template(NOW), rng))
        READING.validate_python(doc)  # passes validation ...
        assert MiniIngest().check(device.id, doc, NOW) == kind  # ... and fails the service check


def test_duplicate_needs_a_reading_already_sent() -> None:
    with pytest.raises(ValueError):
        make_bad(BadKind.DUPLICATE_SEQ, _device().template(NOW), random.Random(0))


def test_injector_honours_the_ratio() -> None:
    inj = Injector(random.Random(5), 0.1)
    draws = [inj.draw(can_duplicate=True) for _ in range(20_000)]
    bad = [k for k in draws if k is not None]
    assert 0.09 < len(bad) / len(draws) < 0.11
    assert set(bad) == set(ALL_KINDS)
    never = Injector(random.Random(5), 0.0)
    assert all(never.draw(can_duplicate=True) is None for _ in range(1000))
    always = Injector(random.Random(5), 1.0, [BadKind.NAN])
    assert all(always.draw(can_duplicate=True) is BadKind.NAN for _ in range(1000))


def test_injector_draws_no_duplicate_before_a_good_reading() -> None:
    inj = Injector(random.Random(5), 1.0)
    assert BadKind.DUPLICATE_SEQ not in {inj.draw(can_duplicate=False) for _ in range(2000)}
    only_dup = Injector(random.Random(5), 1.0, [BadKind.DUPLICATE_SEQ])
    assert only_dup.draw(can_duplicate=False) is None


def test_injector_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        Injector(random.Random(), 1.5)
    with pytest.raises(ValueError):
        Injector(random.Random(), 0.5, [])


def _stream_output(
    seed: int, ratio: float, batch: int, slots: int, steps: int
) -> list[tuple[str, bytes, int, list[BadKind]]]:
    """(device, payload, good readings, bad kinds) of every message of a small fleet's streams."""
    msgs: list[tuple[str, bytes, int, list[BadKind]]] = []
    for d in build_fleet(seed, 10, "retail", start_ns=NOW):
        s = DeviceStream(d, seed=seed, batch=batch, bad_ratio=ratio)
        for _ in range(steps):
            for m in s.take(slots, NOW):
                msgs.append((d.id, m.payload, m.readings, m.bad))
    return msgs


def _accepted(msgs: list[tuple[str, bytes, int, list[BadKind]]]) -> MiniIngest:
    ingest = MiniIngest()
    for device_id, payload, _, _ in msgs:
        ingest.feed(device_id, payload)
    return ingest


@pytest.mark.parametrize("batch", [1, 25])
def test_stream_output_through_ingest_rules_matches_its_counts(batch: int) -> None:
    msgs = _stream_output(4, 0.2, batch, slots=batch, steps=150)
    ingest = _accepted(msgs)
    expected_bad: Counter[str] = Counter()
    for _, _, _, bad in msgs:
        expected_bad.update(EXPECTED_REASON[k] for k in bad)
    good = sum(n for _, _, n, _ in msgs)
    assert len(ingest.accepted) == good
    assert ingest.rejected == expected_bad
    ratio = sum(expected_bad.values()) / (good + sum(expected_bad.values()))
    assert 0.17 < ratio < 0.23


def test_stream_batches_hold_at_most_batch_items_and_message_level_kinds_go_alone() -> None:
    d = build_fleet(1, 2, "retail", start_ns=NOW)[1]
    s = DeviceStream(d, seed=1, batch=10, bad_ratio=0.3)
    for _ in range(200):
        out = s.take(10, NOW)
        for m in out:
            if any(k in MESSAGE_LEVEL for k in m.bad):
                assert m.readings == 0 and len(m.bad) == 1
            else:
                assert m.payload.startswith(b"[")
                assert 1 <= m.readings + len(m.bad) <= 10
        assert sum(m.readings + len(m.bad) for m in out) == 10
    single = DeviceStream(build_fleet(1, 1, "retail", start_ns=NOW)[0], seed=1, batch=1)
    assert single.take(1, NOW)[0].payload.startswith(b"{")


def test_bad_ratio_does_not_change_the_good_readings() -> None:
    clean = _accepted(_stream_output(8, 0.0, 10, slots=10, steps=60)).accepted
    noisy = _accepted(_stream_output(8, 0.3, 10, slots=10, steps=60)).accepted
    assert len(noisy) < len(clean)
    by_device: dict[str, list[Any]] = {}
    for r in clean:
        by_device.setdefault(r["device"], []).append(r)
    for device in by_device:
        mine = [r for r in noisy if r["device"] == device]
        assert mine == by_device[device][: len(mine)]


def test_same_seed_same_payloads() -> None:
    assert _stream_output(3, 0.25, 5, slots=5, steps=50) == _stream_output(3, 0.25, 5, slots=5, steps=50)
