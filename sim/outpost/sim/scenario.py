"""Fleets: which devices a scenario has, and the pure, seeded generator of each device's readings.

No MQTT and no clock here, so tests (and anyone wanting a data set) can draw readings without a
broker: ``build_fleet(seed, devices, scenario)`` then ``device.next_readings()``.

Reproducibility: each device owns a ``random.Random`` seeded from ``(seed, device id)`` (string
seeds are hashed with SHA-512, so the stream is the same in every process and every Python run).
Which process publishes a device, how fast, and with how many bad payloads mixed in never touches
that stream, so the same seed gives the same readings per device. Timestamps are the only part that
follows the wall clock, and only when the caller passes ``ts_ns``; otherwise they are virtual
(``start_ns`` plus one ``period_s`` per step) and fully reproducible too.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Final, Literal

from outpost.contracts import ReadingDict
from outpost.sim.profiles import PROFILES, Profile

Scenario = Literal["retail", "generic"]

SCENARIOS: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    # A small shop, repeating every ten devices: four shelf load cells, two fridges, a till, the
    # door, and a room temperature and a humidity sensor.
    "retail": (
        ("shelf", "shelf_weight"),
        ("fridge", "fridge"),
        ("shelf", "shelf_weight"),
        ("till", "pos"),
        ("shelf", "shelf_weight"),
        ("door", "door_contact"),
        ("fridge", "fridge"),
        ("shelf", "shelf_weight"),
        ("room-temp", "temperature"),
        ("room-hum", "humidity"),
    ),
    # One of each single-purpose sensor, in turn.
    "generic": (
        ("temp", "temperature"),
        ("hum", "humidity"),
        ("vib", "vibration"),
        ("shelf", "shelf_weight"),
        ("door", "door_contact"),
        ("pos", "pos"),
    ),
}
"""(device id stem, profile name) patterns the fleet cycles through."""

DEFAULT_ANOMALY_RATE: Final = 0.002
"""Chance per step that a device starts an anomaly episode (~1 every 500 steps)."""


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """Who a device is: its id (also its topic level) and its profile. Cheap to build for a whole
    fleet, so each publisher process can pick its own share."""

    index: int
    id: str
    profile: str


def fleet_specs(devices: int, scenario: Scenario = "retail") -> list[DeviceSpec]:
    """The ``devices`` devices of a scenario, numbered per id stem: ``shelf-001``, ``fridge-001``..."""
    if devices < 1:
        raise ValueError("a fleet needs at least one device")
    try:
        pattern = SCENARIOS[scenario]
    except KeyError:
        raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}") from None
    width = max(3, len(str(devices)))
    numbers: Counter[str] = Counter()
    out: list[DeviceSpec] = []
    for i in range(devices):
        stem, profile = pattern[i % len(pattern)]
        numbers[stem] += 1
        out.append(DeviceSpec(i, f"{stem}-{numbers[stem]:0{width}d}", profile))
    return out


class SimDevice:
    """One simulated device: its profile's state, its seq counter and its anomaly episodes."""

    def __init__(
        self,
        spec: DeviceSpec,
        seed: int,
        *,
        anomaly_rate: float = DEFAULT_ANOMALY_RATE,
        start_ns: int | None = None,
        period_s: float = 1.0,
        seq_start: int = 0,
    ) -> None:
        self.spec = spec
        self.id = spec.id
        self.rng = random.Random(f"outpost-sim:{seed}:{spec.id}")
        self.profile: Profile = PROFILES[spec.profile](self.rng)
        self.anomaly_rate = anomaly_rate
        self.start_ns = time.time_ns() if start_ns is None else start_ns
        self.period_ns = int(period_s * 1e9)
        self.seq = seq_start
        """The seq the next reading gets."""
        self.steps = 0
        self.anomaly: str | None = None
        """The active anomaly episode, if any (for tests and demos; never on the wire)."""
        self.anomalies: Counter[str] = Counter()
        """Episodes started, by kind."""
        self.last: ReadingDict | None = None
        """The last reading produced (bad-input templates and duplicates start from it)."""
        self._left = 0
        self._progress = 0

    @property
    def profile_name(self) -> str:
        return self.spec.profile

    @property
    def virtual_ns(self) -> int:
        """The timestamp of the next step on the virtual clock."""
        return self.start_ns + self.steps * self.period_ns

    def _advance_anomaly(self) -> None:
        if self.anomaly is not None:
            self._left -= 1
            self._progress += 1
            if self._left <= 0:
                self.anomaly = None
        choices = self.profile.anomalies
        if self.anomaly is None and choices and self.rng.random() < self.anomaly_rate:
            kind, shortest, longest = choices[self.rng.randrange(len(choices))]
            self.anomaly, self._left, self._progress = kind, self.rng.randint(shortest, longest), 0
            self.anomalies[kind] += 1

    def next_readings(self, ts_ns: int | None = None) -> list[ReadingDict]:
        """One sampling step: a reading per metric of the profile, each with the next seq.
        ``ts_ns`` stamps them (the wall clock when publishing); None uses the virtual clock."""
        self._advance_anomaly()
        ts = self.virtual_ns if ts_ns is None else ts_ns
        self.steps += 1
        out: list[ReadingDict] = []
        device = self.id
        seq = self.seq
        for metric, value, unit in self.profile.step(self.rng, self.anomaly, self._progress):
            out.append(
                {"device": device, "seq": seq, "ts": ts, "metric": metric, "value": value, "unit": unit}
            )
            seq += 1
        self.seq = seq
        self.last = out[-1]
        return out

    def template(self, ts_ns: int | None = None) -> ReadingDict:
        """A well-formed reading shaped like this device's, carrying the next (unused) seq: the
        base that bad-input variants break one field of."""
        ts = self.virtual_ns if ts_ns is None else ts_ns
        if self.last is not None:
            return {**self.last, "seq": self.seq, "ts": ts}
        metric = self.profile.metrics[0]
        return {
            "device": self.id,
            "seq": self.seq,
            "ts": ts,
            "metric": metric,
            "value": 0.0,
            "unit": self.profile.unit,
        }


def build_fleet(
    seed: int,
    devices: int,
    scenario: Scenario = "retail",
    *,
    anomaly_rate: float = DEFAULT_ANOMALY_RATE,
    start_ns: int | None = None,
    seq_start: int = 0,
) -> list[SimDevice]:
    """Every device of a scenario, ready to generate. Same arguments, same readings."""
    return [
        SimDevice(spec, seed, anomaly_rate=anomaly_rate, start_ns=start_ns, seq_start=seq_start)
        for spec in fleet_specs(devices, scenario)
    ]
