"""The data folder: what lives where, who owns it, and how a command finds the running site.

One data folder (``data_dir``) can hold several sites, run in turn; each site's durable state is
under ``{data_dir}/sites/{site}/`` (ingest's seq state, memory's log, checkpoints, long-term
memory and sync offsets, inference's registry, the site's Mosquitto folder and service logs), so
two sites never see each other's state. What is not a site's (a cache built once, such as memory's
text encoder) may stay beside ``sites/``.

One ``outpost up`` owns a data folder at a time: it holds an exclusive ``flock`` on
``{data_dir}/outpost.lock`` (the kernel releases it when the process dies, even by kill -9) and
writes ``{data_dir}/run.json`` (site, broker, status page, PID, start time), which every CLI
command reads to find the running site. A run file whose lock nobody holds is stale: the run that
wrote it was killed.

A folder written by the layout before sites (state files directly in ``data_dir``) is never
misread as a site's: :func:`legacy_state` finds it, ``outpost up`` refuses it, and
:func:`migrate` (``outpost data migrate --site NAME``) moves it under the site it belonged to.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from outpost.errors import ConfigError, OutpostError

SITES = "sites"
LOCK_FILE = "outpost.lock"
RUN_FILE = "run.json"

LEGACY_STATE = (
    "ingest.db",
    "memory/oplog.db",
    "memory/checkpoints.db",
    "memory/sync.db",
    "memory/ltm",
    "inference/registry.db",
)
"""Paths (relative to ``data_dir``) that only the layout before sites wrote: any of them there
means the folder holds one unnamed site's state."""

_LEGACY_MOVED = ("ingest.db", "ingest.db-wal", "ingest.db-shm", "inference", "mosquitto", "logs")
"""What :func:`migrate` moves whole; ``memory/`` moves entry by entry, as its ``embedder`` cache
is shared by every site and stays."""
_SHARED_IN_MEMORY = frozenset({"embedder"})


class DataDirBusyError(OutpostError):
    """Another ``outpost up`` owns the data folder."""


def check_folder(data_dir: Path) -> None:
    """Refuse a data folder that cannot be one (a file, or under one): said once, plainly, by every
    command, instead of an OS error from whatever first touches it."""
    path = Path(data_dir).expanduser()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"is under {p}, which is a file"
                raise ConfigError(
                    f"data folder {path} {what}: give a folder (--data-dir or OUTPOST_DATA_DIR)"
                )
            return


def site_dir(data_dir: Path, site: str) -> Path:
    """Where every piece of ``site``'s durable state lives (not created here)."""
    return Path(data_dir).expanduser() / SITES / site


def site_path(data_dir: Path, site: str, *parts: str) -> Path:
    """A path under the site's folder, e.g. ``site_path(d, "shop12", "memory", "oplog.db")``; the
    one place that says where a site's state is, for the services (``ServiceRuntime.state_dir``)
    and for the commands that read it (``outpost log``, ``outpost model``)."""
    return site_dir(data_dir, site).joinpath(*parts)


def sites(data_dir: Path) -> list[str]:
    """The sites that have state in ``data_dir``."""
    root = Path(data_dir).expanduser() / SITES
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


# --- the layout before sites -------------------------------------------------------------------


def legacy_state(data_dir: Path) -> list[Path]:
    """State files of the layout before sites found directly in ``data_dir`` (empty: none)."""
    root = Path(data_dir).expanduser()
    return [root / rel for rel in LEGACY_STATE if (root / rel).exists()]


def refuse_legacy(data_dir: Path) -> None:
    """ConfigError naming the migration when ``data_dir`` holds state of the older layout: read
    as a site's, another site would take its seq state as its own (every reading a duplicate)."""
    found = legacy_state(data_dir)
    if found:
        shown = ", ".join(str(p.relative_to(Path(data_dir).expanduser())) for p in found)
        raise ConfigError(
            f"{data_dir} holds state of an older layout, not kept per site ({shown}): move it under "
            f"the site it belongs to with `outpost data migrate --data-dir {data_dir} --site NAME` "
            "(NAME: the site that ran there, site1 unless OUTPOST_SITE said otherwise), or use another "
            "--data-dir"
        )


def migrate(data_dir: Path, site: str) -> list[tuple[Path, Path]]:
    """Move the older layout's state of ``data_dir`` under ``site`` (refused while an ``outpost up``
    owns the folder, or when that site already has state); returns (from, to) per moved path."""
    root = Path(data_dir).expanduser()
    if not legacy_state(root):
        raise ConfigError(f"nothing to migrate: {root} holds no state of the older layout")
    with DataDirLock(root):
        target = site_dir(root, site)
        if target.exists() and any(target.iterdir()):
            raise ConfigError(f"site {site!r} already has state in {target}: migrate into another site")
        target.mkdir(parents=True, exist_ok=True)
        moves = [(root / n, target / n) for n in _LEGACY_MOVED if (root / n).exists()]
        memory = root / "memory"
        if memory.is_dir():
            moves += [
                (p, target / "memory" / p.name)
                for p in sorted(memory.iterdir())
                if p.name not in _SHARED_IN_MEMORY
            ]
        for src, dst in moves:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dst))
        return moves


# --- ownership: the lock and the run file ------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """What ``{data_dir}/run.json`` says about the ``outpost up`` that owns the folder."""

    site: str
    broker: str
    """HOST:PORT of the site's broker."""
    status_page: str | None
    pid: int
    started: float
    """Unix time."""
    data_dir: str
    live: bool = True
    """False: the run file was left by a run that was killed (nobody holds the lock)."""


def _lock_holder(data_dir: Path) -> bool | None:
    """Whether some process holds the folder's lock (None: there is no lock file); never creates."""
    try:
        fd = os.open(Path(data_dir).expanduser() / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError:
        return True  # unreadable to us: assume someone owns it, never take it by mistake
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a shared lock we may have taken
    return False


def read_run(data_dir: Path) -> RunInfo | None:
    """The folder's run file, ``live`` or stale; None when there is none (or it is unreadable)."""
    path = Path(data_dir).expanduser() / RUN_FILE
    try:
        doc: Any = orjson.loads(path.read_bytes())
        info = RunInfo(
            site=str(doc["site"]),
            broker=str(doc["broker"]),
            status_page=doc.get("status_page"),
            pid=int(doc["pid"]),
            started=float(doc["started"]),
            data_dir=str(doc.get("data_dir", path.parent)),
        )
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return RunInfo(**{**asdict(info), "live": bool(_lock_holder(path.parent))})


class DataDirLock:
    """An exclusive, non-blocking ``flock`` on ``{data_dir}/outpost.lock``: whoever holds it owns
    the folder. Refused with :class:`DataDirBusyError` naming the owner's PID. The kernel drops it when
    the holder dies, so a killed run never blocks the next one; the file descriptor is not inherited
    by children (Python's default), so a child that outlives its parent cannot keep it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self._file: IO[str] | None = None

    def acquire(self) -> DataDirLock:
        check_folder(self.data_dir)
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            f = (self.data_dir / LOCK_FILE).open("a+")
        except OSError as exc:
            raise ConfigError(
                f"data folder {self.data_dir} cannot be used ({exc.strerror or exc}): give a folder "
                "this user can write (--data-dir or OUTPOST_DATA_DIR)"
            ) from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            run = read_run(self.data_dir)
            what = f" (site {run.site!r}, broker {run.broker})" if run is not None and run.live else ""
            raise DataDirBusyError(
                f"{self.data_dir} is in use by outpost up PID {owner}{what}: stop it first "
                "(SIGTERM or Ctrl-C), or give another --data-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                (self.data_dir / RUN_FILE).unlink(missing_ok=True)
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def write_run(self, site: str, broker: str, status_page: str | None = None) -> RunInfo:
        """Write the run file (only the holder may): atomically, so a reader never sees half."""
        if self._file is None:
            raise RuntimeError("write_run without the lock")
        info = RunInfo(site, broker, status_page, os.getpid(), time.time(), str(self.data_dir.resolve()))
        doc = {k: v for k, v in asdict(info).items() if k != "live"}
        tmp = self.data_dir / f".{RUN_FILE}.tmp"
        tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        tmp.replace(self.data_dir / RUN_FILE)
        return info

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()
