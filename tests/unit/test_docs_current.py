"""Generated references must match the code they describe."""

from __future__ import annotations

from pathlib import Path

from outpost.cli.config import reference_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_settings_reference_is_current() -> None:
    current = (ROOT / "docs" / "settings.md").read_text()
    assert current == reference_markdown(), "run: .venv/bin/outpost config reference > docs/settings.md"
