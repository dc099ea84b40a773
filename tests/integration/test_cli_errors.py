"""Bad command lines and settings end with a clear message and exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import orjson
import pytest

from outpost.broker import free_port
from tests.conftest import outpost


def _outpost(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
    return outpost(*args, env={**clean, **(env or {})}, cwd=cwd, timeout=60)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["up", "--broker", "nohost"], "HOST:PORT"),
        (["status", "--broker", "127.0.0.1:99999"], "HOST:PORT"),
        (["demo", "--duration", "-1"], "duration"),
        (["demo", "--bad-ratio", "2"], "bad-ratio"),
        (["sim", "--devices", "0"], "devices"),
        (["bench", "nosuch"], "nosuch"),
        (["nosuch"], "nosuch"),
        (["up", "--broker", ""], "HOST:PORT"),  # an unset variable is not "start our own"
        (["up", "--broker", "no.such.host.invalid:1883"], "does not resolve"),
        (["log", "tail", "--kind", "bogus", "--data-dir", "data"], "'bogus' is not one of"),
        (["up", "--data-dir", "a-file"], "is a file"),
        (["up", "--data-dir", "a-file/below"], "which is a file"),
        (["status", "--data-dir", "a-file"], "is a file"),
        (["data", "where", "--data-dir", "a-file"], "is a file"),
        (["log", "tail", "--data-dir", "a-file"], "is a file"),
    ],
)
def test_bad_arguments(args: list[str], says: str, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    proc = _outpost(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert says in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_broker_is_a_clear_error(tmp_path: Path) -> None:
    proc = _outpost("status", "--broker", f"127.0.0.1:{free_port()}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "no broker at" in proc.stderr
    assert "Traceback" not in proc.stderr
    # with --json a script still finds one object on the last line, the error in it
    proc = _outpost("status", "--json", "--broker", f"127.0.0.1:{free_port()}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "no broker at" in orjson.loads(proc.stdout.strip().splitlines()[-1])["error"]


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"OUTPOST_MQTT__PORT": "not-a-port"}, "mqtt.port"),
        ({"OUTPOST_INGEST__BOGUS": "1"}, "bogus"),
        ({"OUTPOST_SITE": "a/b"}, "site"),
        ({"OUTPOST_CONFIG": "/nonexistent/outpost.yaml"}, "not a file"),
    ],
)
def test_bad_settings(env: dict[str, str], says: str, tmp_path: Path) -> None:
    proc = _outpost("config", "show", env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert says in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_site_file(tmp_path: Path) -> None:
    (tmp_path / "outpost.yaml").write_text("mqtt: {port: [1, 2}\n")
    proc = _outpost("config", "show", cwd=tmp_path)
    assert proc.returncode == 2
    assert "outpost.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_password_never_printed(tmp_path: Path) -> None:
    proc = _outpost("config", "show", env={"OUTPOST_MQTT__PASSWORD": "hunter2-secret"}, cwd=tmp_path)
    assert proc.returncode == 0
    assert "hunter2-secret" not in proc.stdout + proc.stderr


def test_memory_commands_on_bad_files_say_so_and_change_nothing(tmp_path: Path) -> None:
    """``memory cloud`` and ``cloud run`` on a file that is not the cloud side's database, and
    ``log`` on a folder without a log: exit 2 and a message, no traceback, no file touched."""
    import sqlite3

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "replica.db").write_bytes(b"this is not a database at all" * 10)
    other = tmp_path / "other"
    other.mkdir()
    db = sqlite3.connect(other / "replica.db")
    db.execute("CREATE TABLE log (x)")
    db.commit()
    db.close()
    before = (other / "replica.db").read_bytes()
    port = str(free_port())
    for args, says in (
        (["memory", "cloud", "--db", f"sqlite:///{junk}/replica.db"], "cannot use the database"),
        (["memory", "cloud", "--db", f"sqlite:///{other}/replica.db"], "no memory replica in"),
        (
            ["cloud", "run", "--broker", f"127.0.0.1:{port}", "--db", f"sqlite:///{junk}/replica.db"],
            "cannot use the database",
        ),
        (["log", "--data-dir", str(tmp_path / "none"), "tail"], "no operational log for site"),
        (
            ["cloud", "run", "--db", f"sqlite:///{tmp_path}/c.db", "--broker", "127.0.0.1 :1"],
            "name or an IPv4",
        ),
    ):
        proc = _outpost(*args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert says in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert (other / "replica.db").read_bytes() == before
