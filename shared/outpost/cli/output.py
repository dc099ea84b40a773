"""What every ``outpost`` command prints through: tables for people, one JSON object for scripts."""

from __future__ import annotations

import sys

import orjson
from rich.console import Console


def stdout_console() -> Console:
    """Tables at least 140 columns wide even when stdout is a file or a pipe (rich assumes 80)."""
    return Console(highlight=False) if sys.stdout.isatty() else Console(width=140, highlight=False)


def print_json(doc: object) -> None:
    """One JSON object on one line (the ``--json`` contract: the last line is the figures)."""
    print(orjson.dumps(doc).decode(), flush=True)
