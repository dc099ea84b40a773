"""Checkpoints: where an agent's task stands (task id, step, state), saved atomically and versioned,
so a task resumes after a crash from its last saved step instead of starting over or repeating
side effects.

Each save is one SQLite transaction (``synchronous=FULL``): it either happened whole or not at all.
Versions count up from 1 per task; a save may name the version it expects to replace
(compare-and-set), so two workers that both resumed one task cannot both advance it: the second
gets :class:`CheckpointConflict` and must reload. Older versions are kept (``keep``, 10 by
default) for audit and for going back one step.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from outpost.errors import OutpostError
from outpost.store import Store, transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    task TEXT NOT NULL,
    version INTEGER NOT NULL,
    step TEXT NOT NULL,
    state BLOB NOT NULL,
    at_ns INTEGER NOT NULL,
    PRIMARY KEY (task, version)
) WITHOUT ROWID;
"""

MAX_STATE_BYTES = 1024 * 1024


class CheckpointError(OutpostError):
    """A checkpoint request is invalid, or the checkpoint file cannot be used."""


class CheckpointConflict(CheckpointError):  # noqa: N818 (a conflict is the outcome, not a failure)
    """The task's checkpoint is not at the version the save expected: someone else advanced it."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    task: str
    version: int
    step: str
    state: Any
    at_ns: int


class Checkpoints:
    def __init__(self, path: Path, *, keep: int = 10) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.keep = keep
        try:
            self.store = Store(path, _SCHEMA, synchronous="FULL")
        except sqlite3.DatabaseError as exc:
            raise CheckpointError(f"checkpoint file {path} cannot be used ({exc})") from None
        self.db = self.store.db

    def close(self) -> None:
        self.store.close()

    def save(self, task: str, step: str, state: Any, *, expect: int | None = None) -> int:
        """Save a new version of ``task``'s checkpoint and return its number. ``expect``: the
        version this one replaces (0 for the first); a mismatch raises CheckpointConflict."""
        if not isinstance(task, str) or not 0 < len(task) <= 256:
            raise CheckpointError("a task id must be a string of 1 to 256 characters")
        if not isinstance(step, str) or len(step) > 256:
            raise CheckpointError("a step must be a string of at most 256 characters")
        try:
            blob = orjson.dumps(state)
        except TypeError as exc:
            raise CheckpointError(f"the state must be JSON: {exc}") from None
        if len(blob) > MAX_STATE_BYTES:
            raise CheckpointError(f"the state is {len(blob)} bytes, more than {MAX_STATE_BYTES}")
        with transaction(self.db) as db:
            row = db.execute("SELECT max(version) FROM checkpoints WHERE task = ?", (task,)).fetchone()
            current = int(row[0]) if row[0] is not None else 0
            if expect is not None and expect != current:
                raise CheckpointConflict(f"task {task!r} is at version {current}, not {expect}")
            version = current + 1
            db.execute(
                "INSERT INTO checkpoints (task, version, step, state, at_ns) VALUES (?, ?, ?, ?, ?)",
                (task, version, step, blob, time.time_ns()),
            )
            db.execute("DELETE FROM checkpoints WHERE task = ? AND version <= ?", (task, version - self.keep))
        return version

    def load(self, task: str, version: int | None = None) -> Checkpoint | None:
        """The latest checkpoint of ``task`` (or a kept older version), None if there is none."""
        if version is None:
            row = self.db.execute(
                "SELECT task, version, step, state, at_ns FROM checkpoints WHERE task = ? "
                "ORDER BY version DESC LIMIT 1",
                (task,),
            ).fetchone()
        else:
            row = self.db.execute(
                "SELECT task, version, step, state, at_ns FROM checkpoints WHERE task = ? AND version = ?",
                (task, version),
            ).fetchone()
        if row is None:
            return None
        return Checkpoint(str(row[0]), int(row[1]), str(row[2]), orjson.loads(row[3]), int(row[4]))

    def history(self, task: str) -> list[tuple[int, str, int]]:
        """(version, step, at_ns) of the kept versions, newest first."""
        rows = self.db.execute(
            "SELECT version, step, at_ns FROM checkpoints WHERE task = ? ORDER BY version DESC", (task,)
        )
        return [(int(v), str(s), int(a)) for v, s, a in rows]

    def delete(self, task: str) -> int:
        """The task is finished: its checkpoints go; how many."""
        return int(self.db.execute("DELETE FROM checkpoints WHERE task = ?", (task,)).rowcount)
