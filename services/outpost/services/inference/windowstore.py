"""Windows checkpointed to SQLite, so that a restart (a deploy, a crash, kill -9) resumes scoring
at once instead of making every device warm up again.

A checkpoint writes the windows that changed since the last one, every ``inference.checkpoint_s``
(1 s) and at a clean stop. After a kill -9 the windows miss at most that last second of values,
and an event redelivered because it was not yet acknowledged adds its value again: the features
of the next few scores are slightly off, and no event goes unscored for want of a window.
``synchronous=NORMAL``: the checkpoint survives a process crash; after a power loss the windows
may be a checkpoint older, which is the same trade again.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from outpost.services.inference.features import Windows
from outpost.store import Store

_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    device TEXT NOT NULL,
    metric TEXT NOT NULL,
    vals BLOB NOT NULL,
    PRIMARY KEY (device, metric)
) WITHOUT ROWID;
"""


class WindowStore:
    def __init__(self, path: Path) -> None:
        self.store = Store(path, _SCHEMA, synchronous="NORMAL")

    def load(self, windows: Windows) -> int:
        """Fill ``windows`` from the last checkpoint; how many series were restored. A row that
        does not decode (a damaged file) is skipped: it only costs that window its warm-up."""
        n = 0
        for device, metric, blob in self.store.query("SELECT device, metric, vals FROM windows"):
            try:
                values = orjson.loads(blob)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(values, list):
                continue
            for v in values:
                if isinstance(v, int | float) and not isinstance(v, bool):
                    windows.add(str(device), str(metric), float(v))
            n += 1
        windows.dirty.clear()
        return n

    def save(self, windows: Windows) -> int:
        """Write the series that changed since the last save, in one transaction."""
        if not windows.dirty:
            return 0
        dirty, windows.dirty = windows.dirty, set()
        rows = []
        for device, metric in dirty:
            d = windows.series(device, metric)
            if d is not None:
                rows.append((device, metric, orjson.dumps(list(d))))
        self.store.write_many("INSERT OR REPLACE INTO windows (device, metric, vals) VALUES (?, ?, ?)", rows)
        return len(rows)

    def close(self) -> None:
        self.store.close()
