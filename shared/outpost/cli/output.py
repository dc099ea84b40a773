"""What every ``outpost`` command prints through: tables for people, one JSON object for scripts."""

from __future__ import annotations

import os
import sys

import orjson
from rich.console import Console


def stdout_console() -> Console:
    """The terminal's width on a terminal; into a file or a pipe ``COLUMNS`` where set, else 140
    columns (rich would assume 80 and cut the tables for a script that reads them)."""
    if sys.stdout.isatty():
        return Console(highlight=False)
    columns = os.environ.get("COLUMNS", "")
    width = int(columns) if columns.isdigit() and int(columns) >= 20 else 140
    return Console(width=width, highlight=False)


def print_json(doc: object) -> None:
    """One JSON object on one line (the ``--json`` contract: the last line is the figures)."""
    print(orjson.dumps(doc).decode(), flush=True)
