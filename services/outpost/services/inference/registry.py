"""The model registry: a folder of model versions and, in SQLite, which version of each is active,
which one shadows it, and the history that rollback reads.

Files are the registry's catalogue (``{models_dir}/{name}/{version}/manifest.yaml`` + the ONNX file,
checked against the manifest's sha256 before anything uses them); the state database
(``{data_dir}/inference/registry.db``) is the operator's choices. ``outpost model activate`` writes
the state; the running service polls its revision and swaps models between batches, so a change
never drops or double-scores an event. A version that failed to load is marked bad with the reason
and is skipped by rollback.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from outpost.services.inference.backends.base import ModelLoadError
from outpost.services.inference.manifest import (
    VERSION_RE,
    Manifest,
    read_manifest,
    verify,
    version_key,
)
from outpost.store import Store, transaction

PACKAGED_MODELS = Path(__file__).parent / "models"
"""The models the project trains and ships (services/outpost/services/inference/models/)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    name TEXT PRIMARY KEY,
    active TEXT,
    shadow TEXT,
    updated_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version TEXT,
    action TEXT NOT NULL,
    at_ns INTEGER NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS bad (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    reason TEXT NOT NULL,
    at_ns INTEGER NOT NULL,
    files TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('revision', 0);
"""


@dataclass(frozen=True, slots=True)
class ModelState:
    name: str
    active: str | None
    shadow: str | None
    explicit: bool
    """Whether an operator chose ``active`` (else it is the newest release on disk)."""


class Registry:
    def __init__(
        self,
        models_dir: Path,
        state_path: Path,
        *,
        check_load: Callable[[Manifest, Path], None] | None = None,
    ) -> None:
        """``check_load`` runs on every version an operator chooses (activate, shadow, rollback)
        after its checksum: ``outpost model`` loads it for real there, so a file that cannot load
        is refused before the state changes."""
        self.models_dir = models_dir
        self.check_load = check_load
        try:
            self.store = Store(state_path, _SCHEMA, synchronous="FULL")
        except sqlite3.DatabaseError as exc:
            raise ModelLoadError(
                f"registry state {state_path} cannot be used ({exc}): move it aside to start from the "
                "default versions"
            ) from None
        columns = {str(r[1]) for r in self.store.query("PRAGMA table_info(bad)")}
        if "files" not in columns:  # a state file from before fingerprints: its bad marks stay bad
            self.store.db.execute("ALTER TABLE bad ADD COLUMN files TEXT NOT NULL DEFAULT ''")

    def close(self) -> None:
        self.store.close()

    # --- catalogue -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[str]:
        """Versions on disk, oldest first (semver order)."""
        folder = self.models_dir / name
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if p.is_dir() and VERSION_RE.fullmatch(p.name)]
        return sorted(found, key=version_key)

    def folder(self, name: str, version: str) -> Path:
        return self.models_dir / name / version

    def manifest(self, name: str, version: str) -> Manifest:
        if version not in self.versions(name):
            raise ModelLoadError(f"no model {name}@{version} in {self.models_dir}")
        return read_manifest(self.folder(name, version))

    def verify(self, name: str, version: str) -> tuple[Manifest, Path]:
        """The manifest and the checked model file; ModelLoadError saying what is wrong."""
        manifest = self.manifest(name, version)
        return manifest, verify(self.folder(name, version), manifest)

    def _chosen(self, name: str, version: str) -> Manifest:
        """A version an operator chooses: checked, and loaded when a check_load is given."""
        manifest, path = self.verify(name, version)
        if self.check_load is not None:
            self.check_load(manifest, path)
        return manifest

    # --- state -----------------------------------------------------------------------------------
    def revision(self) -> int:
        """Rises on every change of state: the service polls it."""
        return int(self.store.query("SELECT value FROM meta WHERE key = 'revision'")[0][0])

    def state(self, name: str) -> ModelState:
        rows = self.store.query("SELECT active, shadow FROM state WHERE name = ?", (name,))
        if rows and rows[0][0] is not None:
            return ModelState(name, rows[0][0], rows[0][1], True)
        return ModelState(name, self.default_version(name), rows[0][1] if rows else None, False)

    def default_version(self, name: str) -> str | None:
        """The newest release (a pre-release such as ``-int8`` only when there is nothing else)."""
        versions = [v for v in self.versions(name) if not self.is_bad(name, v)]
        releases = [v for v in versions if "-" not in v]
        pick = releases or versions
        return pick[-1] if pick else None

    def fingerprint(self, name: str, version: str) -> str:
        """The version folder's files as they are now (names, sizes, modification times): a
        version found bad is bad for these files only. A release copied into the folder file by
        file can be seen half-written and fail; once its files change it is tried again."""
        folder = self.folder(name, version)
        try:
            parts = [
                f"{p.name}:{st.st_size}:{st.st_mtime_ns}"
                for p in sorted(folder.iterdir())
                if p.is_file() and (st := p.stat())
            ]
        except OSError:
            return ""
        return "|".join(parts)

    def on_disk(self, name: str) -> tuple[str, ...]:
        """Every version of ``name`` with its fingerprint: what the service watches for changes."""
        return tuple(f"{v}={self.fingerprint(name, v)}" for v in self.versions(name))

    def is_bad(self, name: str, version: str) -> bool:
        rows = self.store.query("SELECT files FROM bad WHERE name = ? AND version = ?", (name, version))
        return bool(rows) and rows[0][0] in ("", self.fingerprint(name, version))

    def bad_versions(self, name: str) -> dict[str, str]:
        return {
            str(v): str(r)
            for v, r in self.store.query("SELECT version, reason FROM bad WHERE name = ?", (name,))
            if self.is_bad(name, str(v))
        }

    def history(self, name: str, limit: int = 50) -> list[tuple[int, str | None, str, str]]:
        """(at_ns, version, action, detail), newest first."""
        rows = self.store.query(
            "SELECT at_ns, version, action, detail FROM history WHERE name = ? ORDER BY id DESC LIMIT ?",
            (name, limit),
        )
        return [(int(r[0]), r[1], str(r[2]), str(r[3])) for r in rows]

    def _write(
        self,
        name: str,
        *,
        active: str | None,
        shadow: str | None,
        action: str,
        version: str | None,
        detail: str = "",
    ) -> None:
        now = time.time_ns()
        with transaction(self.store.db) as db:
            db.execute(
                "INSERT INTO state (name, active, shadow, updated_ns) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET active = excluded.active, shadow = excluded.shadow, "
                "updated_ns = excluded.updated_ns",
                (name, active, shadow, now),
            )
            db.execute(
                "INSERT INTO history (name, version, action, at_ns, detail) VALUES (?, ?, ?, ?, ?)",
                (name, version, action, now, detail),
            )
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'revision'")

    def activate(self, name: str, version: str) -> Manifest:
        """Make ``version`` the active one (checked first: a corrupt file is refused here)."""
        manifest = self._chosen(name, version)
        state = self.state(name)
        shadow = None if state.shadow == version else state.shadow
        self.store.db.execute("DELETE FROM bad WHERE name = ? AND version = ?", (name, version))
        self._write(
            name,
            active=version,
            shadow=shadow,
            action="activate",
            version=version,
            detail=state.active or "",  # what it replaced: rollback goes back to it
        )
        return manifest

    def set_shadow(self, name: str, version: str | None) -> None:
        """Score ``version`` alongside the active one (None stops shadowing)."""
        state = self.state(name)
        if version is not None:
            if version == state.active:
                raise ModelLoadError(f"{name}@{version} is the active version; a shadow must be another")
            self._chosen(name, version)
        self._write(
            name,
            active=state.active if state.explicit else None,
            shadow=version,
            action="shadow" if version else "unshadow",
            version=version,
        )

    def rollback(self, name: str) -> str:
        """Go back to the version that was active before the current one, which may have been the
        default rather than an operator's choice (skipping bad or missing versions); the new
        active version. Each activation records what it replaced, so rollback walks back through
        those, newest first."""
        state = self.state(name)
        on_disk = set(self.versions(name))
        for _, version, action, replaced in self.history(name, limit=1000):
            if action not in ("activate", "rollback"):
                continue
            for candidate in (replaced, version):
                if not candidate or candidate == state.active or candidate not in on_disk:
                    continue
                if self.is_bad(name, candidate):
                    continue
                self._chosen(name, candidate)
                self._write(
                    name,
                    active=candidate,
                    shadow=state.shadow if state.shadow != candidate else None,
                    action="rollback",
                    version=candidate,
                    detail=state.active or "",
                )
                return candidate
        raise ModelLoadError(f"{name}: no earlier good version to roll back to (active {state.active})")

    def mark_bad(self, name: str, version: str, reason: str) -> None:
        """Record that ``version`` failed to load, so rollback and the default skip it."""
        now = time.time_ns()
        self.store.db.execute(
            "INSERT INTO bad (name, version, reason, at_ns, files) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(name, version) DO UPDATE SET reason = excluded.reason, at_ns = excluded.at_ns, "
            "files = excluded.files",
            (name, version, reason[:1000], now, self.fingerprint(name, version) or "?"),
        )
        self.store.db.execute(
            "INSERT INTO history (name, version, action, at_ns, detail) VALUES (?, ?, 'failed', ?, ?)",
            (name, version, now, reason[:1000]),
        )
