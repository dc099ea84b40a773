"""A device's class is its id without the trailing number: what figures per kind of device group by."""

from __future__ import annotations

import pytest

from outpost.topics import device_class


@pytest.mark.parametrize(
    ("device", "cls"),
    [
        ("fridge-007", "fridge"),
        ("shelf_12", "shelf"),
        ("cooler-a-12", "cooler-a"),
        ("gw", "gw"),
        ("123", "123"),
        ("x9", "x"),
    ],
)
def test_device_class(device: str, cls: str) -> None:
    assert device_class(device) == cls
