"""Device profiles: what each kind of simulated sensor measures and how its values move.

A profile is a small state machine stepped once per sampling tick with the device's own seeded
``random.Random``. Nothing here reads the clock, so a device's values depend only on (seed, device
id, step number): the rate, the process layout and the bad-input mix never change them, which is
what makes ``--seed`` reproducible.

Anomalies are episodes chosen by the device (see :mod:`outpost.sim.scenario`); a profile only bends
its values the way the real fault would, so that downstream models have something true to find: a
fridge door left open warms the cabinet and makes the compressor labour, an emptied shelf weighs
nothing, a worn bearing vibrates.

Every unit used here is in ``outpost.services.ingest.units.UNITS``, so good readings are accepted.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from typing import ClassVar, Final

Sample = tuple[str, float, str]
"""(metric, value, unit) of one reading, before the device adds its id, seq and timestamp."""


def _c_to_f(c: float) -> float:
    return c * 9.0 / 5.0 + 32.0


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


class Profile(ABC):
    """One kind of device. Subclasses set the class attributes and implement :meth:`step`."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    """Metrics the profile emits, in the order :meth:`step` returns them."""
    anomalies: ClassVar[tuple[tuple[str, int, int], ...]] = ()
    """(kind, shortest, longest episode in steps) of the faults this profile can show."""
    ranges: ClassVar[dict[str, tuple[float, float]]]
    """Plausible canonical range per metric (values converted with the ingest unit table): the
    simulator's promise, checked by the tests."""

    def __init__(self, rng: random.Random) -> None:
        self.unit = "?"  # primary unit; subclasses set it (used for bad-input templates)

    @abstractmethod
    def step(self, rng: random.Random, anomaly: str | None, progress: int) -> list[Sample]:
        """Advance one tick and return its readings. ``anomaly`` is the active episode (or None)
        and ``progress`` the steps since it began."""


class Temperature(Profile):
    """Ambient air temperature of a room; an HVAC failure lets it drift up by several degrees.

    A fifth of the sensors report Fahrenheit, as cheap imported sensors do, so ingest's unit
    normalization is exercised."""

    name = "temperature"
    metrics = ("temperature",)
    anomalies = (("hvac_failure", 120, 900),)
    ranges: ClassVar[dict[str, tuple[float, float]]] = {"temperature": (-10.0, 45.0)}

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.base = rng.uniform(18.0, 23.0)
        self.c = self.base + rng.gauss(0.0, 0.3)
        self.unit = "F" if rng.random() < 0.2 else "C"

    def step(self, rng: random.Random, anomaly: str | None, progress: int) -> list[Sample]:
        target = self.base
        if anomaly == "hvac_failure":
            target = self.base + min(12.0, 0.03 * progress)
        self.c = _clamp(self.c + 0.05 * (target - self.c) + rng.gauss(0.0, 0.04), -10.0, 45.0)
        value = _c_to_f(self.c) if self.unit == "F" else self.c
        return [("temperature", round(value, 2), self.unit)]


class Humidity(Profile):
    """Relative humidity of a room; a leak (or a failed dehumidifier) pushes it towards saturation."""

    name = "humidity"
    metrics = ("humidity",)
    anomalies = (("leak", 120, 900),)
    ranges: ClassVar[dict[str, tuple[float, float]]] = {"humidity": (0.0, 100.0)}

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.base = rng.uniform(35.0, 55.0)
        self.rh = self.base
        self.unit = "%RH"

    def step(self, rng: random.Random, anomaly: str | None, progress: int) -> list[Sample]:
        target = self.base
        if anomaly == "leak":
            target = min(97.0, self.base + 0.2 * progress)
        self.rh = _clamp(self.rh + 0.05 * (target - self.rh) + rng.gauss(0.0, 0.15), 0.0, 100.0)
        return [("humidity", round(self.rh, 1), "%RH")]


class Vibration(Profile):
    """RMS vibration velocity of a machine (ISO 10816 zones: under 2.8 mm/s good, over 7.1 mm/s
    damaging). A bearing fault ramps it into the damaging zone."""

    name = "vibration"
    metrics = ("vibration",)
    anomalies = (("bearing_fault", 60, 600),)
    ranges: ClassVar[dict[str, tuple[float, float]]] = {"vibration": (0.0, 50.0)}

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.base = rng.uniform(0.8, 2.5)
        self.unit = "mm/s"

    def step(self, rng: random.Random, anomaly: str | None, progress: int) -> list[Sample]:
        level = self.base
        if anomaly == "bearing_fault":
            level = self.base + min(15.0, 0.25 * progress)
        value = _clamp(level * math.exp(rng.gauss(0.0, 0.12)), 0.0, 50.0)
        return [("vibration", round(value, 3), "mm/s")]


class ShelfWeight(Profile):
    """A load cell under a shelf tray: shoppers take items one to three at a time, staff restock
    when it runs low. The ``shelf_emptied`` anomaly (a sweep theft, or a mis-stocked shelf) clears
    it within a few steps and leaves it empty until the episode ends. A quarter report grams."""

    name = "shelf_weight"
    metrics = ("shelf_weight",)
    anomalies = (("shelf_emptied", 60, 600),)
    ranges: ClassVar[dict[str, tuple[float, float]]] = {"shelf_weight": (0.0, 50.0)}

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.item_kg = rng.uniform(0.2, 1.5)
        self.capacity = max(4, int(rng.uniform(8.0, 40.0) / self.item_kg))
        self.tray_kg = rng.uniform(0.5, 2.0)
        self.stock = self.capacity
        self.unit = "g" if rng.random() < 0.25 else "kg"

    def step(self, rng: random.Random, anomaly: str | None, progress: int) -> list[Sample]:
        if anomaly == "shelf_emptied":
            self.stock = max(0, self.stock - rng.randint(3, 10))
        else:
            if self.stock > 0 and rng.random() < 0.05:
                self.stock = max(0, self.stock - rng.randint(1, 3))
            if self.stock < max(1, self.capacity // 5) and rng.random() < 0.02:
                self.stock = self.capacity
        kg = max(0.0, self.stock * self.item_kg + self.tray_kg + rng.gauss(0.0, 0.005))
        if self.unit == "g":
            return [("shelf_weight", round(kg * 1000.0, 1), "g")]
        return [("shelf_weight", round(kg, 3), "kg")]


class DoorContact(Profile):
    """A reed switch on a shop door: 1 open, 0 closed. Customers open it for a few seconds; the
    ``door_held_open`` anomaly (a wedge, a broken closer) keeps it open for the whole episode."""

    name = "door_contact"
    metrics = ("door",)
    anomalies = (("door_held_open", 60, 900),)
    ranges: ClassVar[dict[str, tuple[float, float]]] = {"door": (0.0, 1.0)}

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.open_left = 0
        self.traffic = rng.uniform(0.03, 0.15)
        self.unit = "state"

    def step(self, rng: random.Random, anomaly: str | None, progress: int) -> list[Sample]:
        if anomaly == "door_held_open":
            return [("door", 1.0, "state")]
        if self.open_left > 0:
            self.open_left -= 1
        elif rng.random() < self.traffic:
            self.open_left = rng.randint(1, 6)
        return [("door", 1.0 if self.open_left > 0 else 0.0, "state")]


class PointOfSale(Profile):
    """A till: each step is one sale, reported as its amount (EUR) and its item count. The
    ``sale_spike`` anomaly (a mis-keyed price, or fraud) multiplies amounts by ten or so."""

    name = "pos"
    metrics = ("sale_amount", "items")
    anomalies = (("sale_spike", 5, 60),)
    ranges: ClassVar[dict[str, tuple[float, float]]] = {"sale_amount": (0.0, 20_000.0), "items": (1.0, 40.0)}

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.mean_price = rng.uniform(2.0, 8.0)
        self.unit = "EUR"

    def step(self, rng: random.Random, anomaly: str | None, progress: int) -> list[Sample]:
        items = 1
        while items < 40 and rng.random() < 0.8:
            items += 1
        amount = sum(self.mean_price * rng.lognormvariate(0.0, 0.5) for _ in range(items))
        if anomaly == "sale_spike":
            amount *= rng.uniform(8.0, 15.0)
        return [("sale_amount", round(amount, 2), "EUR"), ("items", float(items), "count")]


class Fridge(Profile):
    """A display fridge's controller: cabinet temperature, humidity, compressor vibration and door.

    The compressor cycles on a thermostat (on above setpoint + 1 C, off below setpoint - 1 C). A
    ``door_left_open`` episode lets warm shop air in: the temperature drifts up towards the room,
    humidity rises, and the compressor runs flat out with a vibration spike. A
    ``compressor_fault`` shakes the compressor hard while it no longer cools."""

    name = "fridge"
    metrics = ("temperature", "humidity", "vibration", "door")
    anomalies = (("door_left_open", 60, 600), ("compressor_fault", 120, 900))
    ranges: ClassVar[dict[str, tuple[float, float]]] = {
        "temperature": (-5.0, 25.0),
        "humidity": (0.0, 100.0),
        "vibration": (0.0, 50.0),
        "door": (0.0, 1.0),
    }
    ROOM_C: Final = 21.0

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.setpoint = rng.uniform(2.5, 5.0)
        self.c = self.setpoint + rng.uniform(-1.0, 1.0)
        self.rh = rng.uniform(65.0, 80.0)
        self.compressor = rng.random() < 0.5
        self.door_left = 0
        self.unit = "C"

    def step(self, rng: random.Random, anomaly: str | None, progress: int) -> list[Sample]:
        door_open = False
        if anomaly == "door_left_open":
            door_open = True
        elif self.door_left > 0:
            self.door_left -= 1
            door_open = True
        elif rng.random() < 0.03:
            self.door_left = rng.randint(1, 4)
            door_open = True
        broken = anomaly == "compressor_fault"
        if self.c > self.setpoint + 1.0 or door_open:
            self.compressor = True
        elif self.c < self.setpoint - 1.0:
            self.compressor = False
        cooling = 0.0 if broken or not self.compressor else 0.04
        warming = (0.15 if door_open else 0.012) * (self.ROOM_C - self.c) / (self.ROOM_C - self.setpoint)
        self.c = _clamp(self.c + warming - cooling + rng.gauss(0.0, 0.02), -5.0, 25.0)
        rh_target = 92.0 if door_open else 72.0
        self.rh = _clamp(self.rh + 0.05 * (rh_target - self.rh) + rng.gauss(0.0, 0.2), 0.0, 100.0)
        if broken:
            vib = rng.uniform(10.0, 20.0)
        elif self.compressor:
            vib = rng.uniform(6.0, 12.0) if anomaly == "door_left_open" else rng.uniform(1.5, 4.0)
        else:
            vib = rng.uniform(0.1, 0.5)
        return [
            ("temperature", round(self.c, 2), "C"),
            ("humidity", round(self.rh, 1), "%RH"),
            ("vibration", round(vib, 3), "mm/s"),
            ("door", 1.0 if door_open else 0.0, "state"),
        ]


PROFILES: Final[dict[str, type[Profile]]] = {
    p.name: p for p in (Temperature, Humidity, Vibration, ShelfWeight, DoorContact, PointOfSale, Fridge)
}
"""Every profile by name (the names used in reports and ``--scenario`` mixes)."""
