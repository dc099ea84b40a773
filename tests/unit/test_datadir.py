"""The data folder: per-site paths, the older layout refused and migrated, the lock and run file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from outpost.datadir import (
    LOCK_FILE,
    RUN_FILE,
    DataDirBusyError,
    DataDirLock,
    legacy_state,
    migrate,
    read_run,
    refuse_legacy,
    site_path,
    sites,
)
from outpost.errors import ConfigError


def _old_layout(root: Path) -> None:
    (root / "memory" / "embedder").mkdir(parents=True)
    (root / "memory" / "embedder" / "model.onnx").write_bytes(b"shared cache")
    (root / "memory" / "oplog.db").write_bytes(b"log")
    (root / "memory" / "ltm").mkdir()
    (root / "inference").mkdir()
    (root / "inference" / "registry.db").write_bytes(b"registry")
    (root / "ingest.db").write_bytes(b"seq state")
    (root / "ingest.db-wal").write_bytes(b"wal")
    (root / "logs").mkdir()
    (root / "logs" / "ingest.log").write_text("old log")


def test_each_site_has_its_own_folder(tmp_path: Path) -> None:
    assert site_path(tmp_path, "a", "ingest.db") != site_path(tmp_path, "b", "ingest.db")
    assert site_path(tmp_path, "a", "memory", "oplog.db") == tmp_path / "sites" / "a" / "memory" / "oplog.db"
    assert sites(tmp_path) == []
    site_path(tmp_path, "b").mkdir(parents=True)
    site_path(tmp_path, "a").mkdir(parents=True)
    assert sites(tmp_path) == ["a", "b"]


def test_the_older_layout_is_refused_then_migrated_into_a_named_site(tmp_path: Path) -> None:
    _old_layout(tmp_path)
    with pytest.raises(ConfigError, match="outpost data migrate"):
        refuse_legacy(tmp_path)
    moved = migrate(tmp_path, "shop12")
    assert {dst.relative_to(tmp_path).as_posix() for _, dst in moved} == {
        "sites/shop12/ingest.db",
        "sites/shop12/ingest.db-wal",
        "sites/shop12/inference",
        "sites/shop12/logs",
        "sites/shop12/memory/oplog.db",
        "sites/shop12/memory/ltm",
    }
    assert site_path(tmp_path, "shop12", "ingest.db").read_bytes() == b"seq state"
    assert site_path(tmp_path, "shop12", "inference", "registry.db").read_bytes() == b"registry"
    # the shared text-encoder cache is no site's: it stays
    assert (tmp_path / "memory" / "embedder" / "model.onnx").read_bytes() == b"shared cache"
    assert legacy_state(tmp_path) == []
    refuse_legacy(tmp_path)  # no longer refused
    with pytest.raises(ConfigError, match="nothing to migrate"):
        migrate(tmp_path, "shop12")


def test_migration_never_overwrites_a_site_and_waits_for_no_running_stack(tmp_path: Path) -> None:
    _old_layout(tmp_path)
    site_path(tmp_path, "taken", "memory").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already has state"):
        migrate(tmp_path, "taken")
    with DataDirLock(tmp_path), pytest.raises(DataDirBusyError, match=f"PID {os.getpid()}"):
        migrate(tmp_path, "other")
    assert (tmp_path / "ingest.db").exists()


def test_the_lock_is_exclusive_and_the_run_file_names_the_owner(tmp_path: Path) -> None:
    assert read_run(tmp_path) is None
    with DataDirLock(tmp_path) as lock:
        lock.write_run("shop12", "127.0.0.1:1884")
        info = read_run(tmp_path)
        assert info is not None and info.live
        assert (info.site, info.broker, info.pid, info.status_page) == (
            "shop12",
            "127.0.0.1:1884",
            os.getpid(),
            None,
        )
        with pytest.raises(
            DataDirBusyError, match=rf"PID {os.getpid()} \(site 'shop12', broker 127.0.0.1:1884\)"
        ):
            DataDirLock(tmp_path).acquire()
    # released on exit: the run file goes, the next owner gets the folder
    assert read_run(tmp_path) is None
    DataDirLock(tmp_path).acquire().release()


def test_a_lock_held_by_a_killed_process_is_free_and_its_run_file_stale(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from outpost.datadir import DataDirLock; "
            "lock = DataDirLock(Path(sys.argv[1])).acquire(); lock.write_run('s1', '127.0.0.1:1'); "
            "print('held', flush=True); time.sleep(600)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(DataDirBusyError, match=f"PID {holder.pid}"):
        DataDirLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    stale = read_run(tmp_path)
    assert stale is not None and not stale.live and stale.pid == holder.pid
    with DataDirLock(tmp_path) as lock:  # the kernel released it with the process
        lock.write_run("s2", "127.0.0.1:2")
        now = read_run(tmp_path)
        assert now is not None and now.live and now.site == "s2" and now.pid == os.getpid()
    assert (tmp_path / LOCK_FILE).exists() and not (tmp_path / RUN_FILE).exists()
