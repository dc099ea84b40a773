"""The pure fleet generator: composition, reproducibility, value ranges, anomalies."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from outpost.contracts import READING
from outpost.services.ingest.units import UNITS, normalize
from outpost.sim import SimDevice, build_fleet, fleet_specs
from outpost.sim.profiles import PROFILES, Fridge, ShelfWeight, Temperature
from outpost.topics import is_segment

START = 1_790_000_000 * 10**9


def _values(devices: list[SimDevice], steps: int) -> list[list[tuple[str, int, float, str]]]:
    return [
        [(r["metric"], r["seq"], r["value"], r["unit"]) for _ in range(steps) for r in d.next_readings()]
        for d in devices
    ]


def test_retail_fleet_is_a_small_shop() -> None:
    specs = fleet_specs(20, "retail")
    by_profile = Counter(s.profile for s in specs)
    assert by_profile == {
        "shelf_weight": 8,
        "fridge": 4,
        "pos": 2,
        "door_contact": 2,
        "temperature": 2,
        "humidity": 2,
    }
    ids = [s.id for s in specs]
    assert len(set(ids)) == len(ids)
    assert all(is_segment(i) for i in ids)
    assert ids[:4] == ["shelf-001", "fridge-001", "shelf-002", "till-001"]


def test_generic_fleet_cycles_through_every_basic_profile() -> None:
    specs = fleet_specs(12, "generic")
    assert Counter(s.profile for s in specs) == {
        p: 2 for p in ("temperature", "humidity", "vibration", "shelf_weight", "door_contact", "pos")
    }


def test_ids_widen_for_large_fleets() -> None:
    specs = fleet_specs(12_000, "generic")
    assert specs[-1].id == "pos-02000"
    assert all(is_segment(s.id) for s in specs[::997])


def test_unknown_scenario_and_empty_fleet_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown scenario"):
        fleet_specs(3, "factory")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        fleet_specs(0)


def test_same_seed_same_readings_including_timestamps() -> None:
    a = build_fleet(42, 12, "retail", start_ns=START)
    b = build_fleet(42, 12, "retail", start_ns=START)
    for da, db in zip(a, b, strict=True):
        for _ in range(300):
            assert da.next_readings() == db.next_readings()


def test_other_seed_other_values() -> None:
    a = _values(build_fleet(1, 6, "generic", start_ns=START), 50)
    b = _values(build_fleet(2, 6, "generic", start_ns=START), 50)
    assert a != b


def test_a_device_does_not_depend_on_the_rest_of_the_fleet() -> None:
    """A publisher process builds only its share of the fleet: each device's stream must be the
    same as when the whole fleet is built, and must not depend on how other devices are stepped."""
    fleet = build_fleet(7, 10, "retail", start_ns=START)
    alone = SimDevice(fleet_specs(10, "retail")[6], 7, start_ns=START)
    for d in fleet[:6]:  # stepping other devices first must not matter
        d.next_readings()
    assert [alone.next_readings() for _ in range(100)] == [fleet[6].next_readings() for _ in range(100)]


def test_seq_is_per_device_monotonic_from_seq_start_and_ts_is_virtual() -> None:
    d = SimDevice(fleet_specs(2, "retail")[1], 3, start_ns=START, seq_start=100)  # a fridge: 4 metrics
    seqs: list[int] = []
    for step in range(10):
        readings = d.next_readings()
        assert {r["ts"] for r in readings} == {START + step * 10**9}
        seqs += [r["seq"] for r in readings]
    assert seqs == list(range(100, 140))
    wall = d.next_readings(ts_ns=123)
    assert {r["ts"] for r in wall} == {123}


@pytest.mark.parametrize("scenario", ["retail", "generic"])
def test_every_reading_is_valid_and_in_its_profiles_range(scenario: str) -> None:
    # A high anomaly rate so that the fault episodes are inside the ranges too.
    for anomaly_rate in (0.0, 0.05):
        for d in build_fleet(5, 30, scenario, anomaly_rate=anomaly_rate, start_ns=START):  # type: ignore[arg-type]
            ranges = PROFILES[d.profile_name].ranges
            for _ in range(400):
                for r in d.next_readings():
                    READING.validate_python(r)
                    assert r["device"] == d.id
                    assert r["unit"] in UNITS
                    canonical = normalize(r["value"], r["unit"])
                    assert canonical is not None
                    lo, hi = ranges[r["metric"]]
                    assert lo <= canonical[0] <= hi, (d.id, r)


def test_units_vary_so_normalization_is_exercised() -> None:
    units = Counter(
        r["unit"] for d in build_fleet(0, 200, "generic", start_ns=START) for r in d.next_readings()
    )
    assert {"C", "F", "kg", "g", "%RH", "mm/s", "state", "EUR", "count"} <= set(units)


def test_anomaly_episodes_start_and_are_counted() -> None:
    fleet = build_fleet(9, 20, "retail", anomaly_rate=0.01, start_ns=START)
    seen: Counter[str] = Counter()
    for d in fleet:
        for _ in range(500):
            d.next_readings()
            if d.anomaly:
                seen[d.anomaly] += 1
    started = sum((d.anomalies for d in fleet), Counter[str]())
    assert set(started) >= {"shelf_emptied", "door_held_open"}
    assert set(seen) <= {k for p in PROFILES.values() for k, _, _ in p.anomalies}
    quiet = build_fleet(9, 20, "retail", anomaly_rate=0.0, start_ns=START)
    for d in quiet:
        for _ in range(200):
            d.next_readings()
        assert not d.anomalies


def _fridge_run(anomaly: str | None, steps: int = 300) -> list[dict[str, float]]:
    rng = random.Random(1)
    f = Fridge(rng)
    return [{m: v for m, v, _ in f.step(rng, anomaly, i)} for i in range(steps)]


def test_fridge_door_left_open_warms_the_cabinet_and_shakes_the_compressor() -> None:
    normal = _fridge_run(None)
    open_ = _fridge_run("door_left_open")
    assert max(s["temperature"] for s in normal) < 7.0
    assert all(s["door"] == 1.0 for s in open_)
    assert open_[-1]["temperature"] > 10.0
    assert min(s["vibration"] for s in open_) >= 6.0
    assert open_[-1]["humidity"] > max(s["humidity"] for s in normal[50:])


def test_fridge_compressor_fault_vibrates_and_stops_cooling() -> None:
    fault = _fridge_run("compressor_fault")
    assert min(s["vibration"] for s in fault) >= 10.0
    assert fault[-1]["temperature"] > fault[0]["temperature"] + 2.0


def test_shelf_emptied_leaves_only_the_tray() -> None:
    rng = random.Random(2)
    s = ShelfWeight(rng)
    full = s.step(rng, None, 0)[0][1]
    for i in range(30):
        value = s.step(rng, "shelf_emptied", i)[0][1]
    kg = value / 1000.0 if s.unit == "g" else value
    assert kg < s.tray_kg + 0.05 < full / (1000.0 if s.unit == "g" else 1.0)


def test_hvac_failure_drifts_room_temperature_up() -> None:
    rng = random.Random(3)
    t = Temperature(rng)
    start = t.c
    for i in range(400):
        t.step(rng, "hvac_failure", i)
    assert t.c > start + 5.0
