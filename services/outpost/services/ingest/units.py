"""Unit normalization: a small explicit table (docs/ingest.md, "Units", lists it).

A table rather than a units library: ingest converts a handful of units per reading on its hot path,
a dict lookup and one multiply-add costs ~100 ns where pint costs tens of microseconds, and an
explicit list is easy to audit. Each unit maps to (canonical unit, scale, offset):
``canonical = value * scale + offset``.
"""

from __future__ import annotations

from typing import Final

UNITS: Final[dict[str, tuple[str, float, float]]] = {
    # temperature -> degrees Celsius
    "C": ("C", 1.0, 0.0),
    "°C": ("C", 1.0, 0.0),
    "degC": ("C", 1.0, 0.0),
    "F": ("C", 5.0 / 9.0, -32.0 * 5.0 / 9.0),
    "°F": ("C", 5.0 / 9.0, -32.0 * 5.0 / 9.0),
    "degF": ("C", 5.0 / 9.0, -32.0 * 5.0 / 9.0),
    "K": ("C", 1.0, -273.15),
    # relative humidity -> percent RH
    "%RH": ("%RH", 1.0, 0.0),
    "RH": ("%RH", 100.0, 0.0),
    # mass -> kilograms
    "kg": ("kg", 1.0, 0.0),
    "g": ("kg", 0.001, 0.0),
    "lb": ("kg", 0.45359237, 0.0),
    "oz": ("kg", 0.028349523125, 0.0),
    # vibration velocity (ISO 10816 RMS) -> millimetres per second
    "mm/s": ("mm/s", 1.0, 0.0),
    "in/s": ("mm/s", 25.4, 0.0),
    # acceleration -> metres per second squared
    "m/s2": ("m/s2", 1.0, 0.0),
    "m/s^2": ("m/s2", 1.0, 0.0),
    "gn": ("m/s2", 9.80665, 0.0),
    # power and energy
    "W": ("W", 1.0, 0.0),
    "kW": ("W", 1000.0, 0.0),
    "Wh": ("Wh", 1.0, 0.0),
    "kWh": ("Wh", 1000.0, 0.0),
    # dimensionless
    "%": ("%", 1.0, 0.0),
    "ratio": ("%", 100.0, 0.0),
    "state": ("state", 1.0, 0.0),
    "bool": ("state", 1.0, 0.0),
    "count": ("count", 1.0, 0.0),
    "ppm": ("ppm", 1.0, 0.0),
    "lux": ("lux", 1.0, 0.0),
    # money: kept as sent (ISO 4217); converting needs rates, which ingest does not own
    "EUR": ("EUR", 1.0, 0.0),
    "USD": ("USD", 1.0, 0.0),
    "GBP": ("GBP", 1.0, 0.0),
    # seconds
    "s": ("s", 1.0, 0.0),
    "ms": ("s", 0.001, 0.0),
}


def normalize(value: float, unit: str) -> tuple[float, str] | None:
    """The value in its canonical unit, or None when the unit is unknown."""
    entry = UNITS.get(unit)
    if entry is None:
        return None
    canonical, scale, offset = entry
    if scale == 1.0 and offset == 0.0:
        return value, canonical
    return value * scale + offset, canonical
