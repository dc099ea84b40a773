"""The disk under a service's data folder, as the service reports it (docs/settings.md, ``disk``).

Three conditions, each a problem in the service's retained status (``health: degraded``) and in
its metrics' state, cleared by themselves when they end:

* **disk full**: a write of one of the service's databases failed for space (:class:`DiskFull`,
  recognised once, in :mod:`outpost.store`) and no write of it has succeeded since;
* **disk low**: less than ``disk.warn_free_mb`` is free on the folder's file system, so an operator
  hears of it before the site stops writing;
* **data folder over budget**: the folder holds more than ``disk.max_data_mb``.

The service kit runs one per service (``rt.disk``): :meth:`DiskWatch.poll` on every tick (a look at
a dict), :meth:`DiskWatch.measure` every ``disk.check_s`` (``statvfs`` and a walk of the folder).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from outpost.metrics import Metrics
from outpost.settings import DiskSettings
from outpost.store import full_databases

MB = 1024 * 1024


def folder_bytes(folder: Path) -> int:
    """What the files under ``folder`` take (a vanished file, a race with a writer, is skipped)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total


class DiskWatch:
    def __init__(
        self,
        folder: Path,
        settings: DiskSettings,
        metrics: Metrics,
        on_change: Callable[[], None],
    ) -> None:
        """``on_change`` runs when the problems change (the kit republishes its status)."""
        self.folder = folder
        self.settings = settings
        self.metrics = metrics
        self._on_change = on_change
        self._full: dict[str, str] = {}
        self._low = ""
        self._over = ""
        self.free_mb = -1.0
        self.data_mb = -1.0

    @property
    def problems(self) -> list[str]:
        out = []
        if self._full:
            path, why = next(iter(self._full.items()))
            more = f" (and {len(self._full) - 1} more)" if len(self._full) > 1 else ""
            out.append(f"disk full: writes to {path} fail{more}: {why}")
        return [p[:300] for p in (*out, self._low, self._over) if p]

    @property
    def full(self) -> bool:
        return bool(self._full)

    def poll(self) -> None:
        """Whether a database under the folder is full now (cheap: every tick)."""
        full = full_databases(self.folder)
        if full.keys() != self._full.keys():
            if full.keys() - self._full.keys():
                self.metrics.counters["disk_full"] += 1
            self._full = full
            self._on_change()

    def measure(self) -> None:
        """Free space and the folder's size against the budget."""
        s = self.settings
        try:
            st = os.statvfs(self.folder)
        except OSError:
            return  # no folder yet: nothing written, nothing to warn of
        free = st.f_bavail * st.f_frsize / MB
        data = folder_bytes(self.folder) / MB
        self.free_mb, self.data_mb = round(free, 1), round(data, 1)
        low = (
            f"disk low: {free:.0f} MB free under {self.folder} (disk.warn_free_mb {s.warn_free_mb})"
            if free < s.warn_free_mb
            else ""
        )
        over = (
            f"data folder over budget: {data:.0f} MB in {self.folder} (disk.max_data_mb {s.max_data_mb})"
            if s.max_data_mb and data > s.max_data_mb
            else ""
        )
        if (low, over) != (self._low, self._over):
            self._low, self._over = low, over
            self._on_change()

    def state(self) -> dict[str, Any]:
        return {"disk_free_mb": self.free_mb, "data_mb": self.data_mb, "disk_full": self.full}
