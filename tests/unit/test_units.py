"""Unit normalization table."""

from __future__ import annotations

import math

import pytest

from outpost.services.ingest.units import UNITS, normalize


@pytest.mark.parametrize(
    ("value", "unit", "expected", "canonical"),
    [
        (21.5, "C", 21.5, "C"),
        (21.5, "°C", 21.5, "C"),
        (21.5, "degC", 21.5, "C"),
        (32.0, "F", 0.0, "C"),
        (212.0, "°F", 100.0, "C"),
        (-40.0, "degF", -40.0, "C"),
        (273.15, "K", 0.0, "C"),
        (0.0, "K", -273.15, "C"),
        (45.0, "%RH", 45.0, "%RH"),
        (0.45, "RH", 45.0, "%RH"),
        (1500.0, "g", 1.5, "kg"),
        (1.0, "lb", 0.45359237, "kg"),
        (16.0, "oz", 0.45359237, "kg"),
        (1.0, "in/s", 25.4, "mm/s"),
        (1.0, "gn", 9.80665, "m/s2"),
        (3.0, "m/s^2", 3.0, "m/s2"),
        (2.5, "kW", 2500.0, "W"),
        (1.2, "kWh", 1200.0, "Wh"),
        (0.25, "ratio", 25.0, "%"),
        (1.0, "bool", 1.0, "state"),
        (250.0, "ms", 0.25, "s"),
        (9.99, "EUR", 9.99, "EUR"),
        (7.0, "count", 7.0, "count"),
    ],
)
def test_conversions(value: float, unit: str, expected: float, canonical: str) -> None:
    out = normalize(value, unit)
    assert out is not None
    assert out[1] == canonical
    assert math.isclose(out[0], expected, rel_tol=1e-12, abs_tol=1e-9)


@pytest.mark.parametrize("unit", ["furlong", "c", "", "CELSIUS", "kg "])
def test_unknown_units(unit: str) -> None:
    assert normalize(1.0, unit) is None


def test_table_is_consistent() -> None:
    canonicals = {canonical for canonical, _, _ in UNITS.values()}
    for canonical in canonicals:
        # every canonical unit maps to itself unchanged
        assert UNITS[canonical] == (canonical, 1.0, 0.0)
    for unit, (_, scale, offset) in UNITS.items():
        assert 1 <= len(unit) <= 16  # the reading contract's unit length
        assert math.isfinite(scale)
        assert scale > 0
        assert math.isfinite(offset)


def test_the_docs_list_every_unit() -> None:
    """The table the code cites (docs/ingest.md, "Units") names every unit ingest accepts."""
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "ingest.md").read_text()
    table = doc.split("## Units", 1)[1].split("\n## ", 1)[0]
    missing = [unit for unit in UNITS if f"`{unit}`" not in table]
    assert not missing, f"docs/ingest.md's Units table lacks {missing}"


def test_every_cited_document_is_in_the_repository() -> None:
    """What the code and the docs cite (docs/*.md) exists, so a reader can follow every reference."""
    import re
    from pathlib import Path

    root = Path(__file__).parents[2]
    sources = [
        *root.glob("shared/**/*.py"),
        *root.glob("services/**/*.py"),
        *root.glob("sim/**/*.py"),
        *root.glob("docs/*.md"),
        root / "README.md",
    ]
    cited = {
        (path, m.group(0))
        for path in sources
        for m in re.finditer(r"docs/[a-z_/-]+\.md", path.read_text(encoding="utf-8"))
    }
    missing = sorted({c for _, c in cited if not (root / c).exists()})
    assert not missing, f"cited but not in the repository: {missing}"
