"""docs/telemetry.md lists every measurement and field of the catalog, with the catalog's unit and
priority, and nothing the service does not write."""

from __future__ import annotations

import re
from pathlib import Path

from outpost.services.telemetry.catalog import MEASUREMENTS

DOC = Path(__file__).resolve().parents[2] / "docs" / "telemetry.md"
ROW = re.compile(r"^\| `([a-z_]+)` \| (.+) \|$")


def rows() -> tuple[dict[str, list[str]], dict[tuple[str, str], list[str]]]:
    measurements: dict[str, list[str]] = {}
    fields: dict[tuple[str, str], list[str]] = {}
    text = DOC.read_text()
    section = text[text.index("## Measurements") : text.index("\n## ", text.index("## Measurements") + 5)]
    for line in section.splitlines():
        m = ROW.match(line)
        if m is None:
            continue
        cells = [c.strip() for c in m.group(2).split(" | ")]
        if cells[0].startswith("`"):
            fields[(m.group(1), cells[0].strip("`"))] = cells[1:]
        else:
            measurements[m.group(1)] = cells
    return measurements, fields


def test_the_doc_lists_every_measurement_and_field_of_the_catalog() -> None:
    measurements, fields = rows()
    assert set(measurements) == set(MEASUREMENTS)
    for name, m in MEASUREMENTS.items():
        priority, tags = measurements[name][0], measurements[name][1]
        assert priority == m.priority.name.lower(), name
        assert tags == ", ".join(m.tags), name
    want = {(name, f): spec.unit for name, m in MEASUREMENTS.items() for f, spec in m.fields.items()}
    assert {k: v[0] for k, v in fields.items()} == want


def test_the_doc_leaves_the_status_page_section_to_its_writer() -> None:
    assert "## Status page" in DOC.read_text()
