"""What every ``outpost`` command prints through: tables for people, one JSON object for scripts."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import orjson
import typer
from rich.console import Console

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on the last line.")]
"""``--json`` of every command whose figures a script reads (:func:`print_json`)."""


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
