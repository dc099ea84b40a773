"""Operating a site as a person does: ``outpost up`` owns its data folder and dies whole, the CLI
finds the running site from any folder, two sites run in turn in one folder without seeing each
other's state, and every wrong start says why with exit code 2."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from outpost.broker import Mosquitto, free_port
from outpost.bus import Bus
from outpost.datadir import DataDirLock, read_run, site_path
from outpost.services.inference.registry import PACKAGED_MODELS, Registry
from outpost.services.ingest.service import run as run_ingest
from outpost.services.memory.oplog import OpLog, Record
from outpost.services.memory.service import run as run_memory
from outpost.services.registry import OutpostSettings
from outpost.supervisor import Supervisor
from tests.conftest import OUTPOST, Collector, ServiceThread, make_reading, outpost, wait_status, wait_until

pytestmark = pytest.mark.integration

SERVICES = {"ingest", "inference", "memory", "agents", "connectors", "telemetry", "uplink"}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An operator's environment: no OUTPOST_* of the test run's, a home of its own (the default
    data folder is ~/.local/share/outpost), and the test run's shared text-encoder cache."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("OUTPOST_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)
    cache = os.environ.get("OUTPOST_MEMORY__EMBEDDER_CACHE")
    if cache:
        env["OUTPOST_MEMORY__EMBEDDER_CACHE"] = cache
    return env | extra


def _default_data(env: dict[str, str]) -> Path:
    return Path(env["HOME"]) / ".local" / "share" / "outpost"


def _up(env: dict[str, str], cwd: Path, *args: str) -> subprocess.Popen[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [*OUTPOST, "up", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _status(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return outpost("status", "--wait", "2", *args, env=env, cwd=cwd, timeout=60)


def _online(env: dict[str, str], cwd: Path) -> bool:
    p = _status(env, cwd, "--json")
    if p.returncode != 0:
        return False
    doc = orjson.loads(p.stdout.strip().splitlines()[-1])
    return {n for n, s in doc["services"].items() if s["state"] == "online"} == SERVICES


def _descendants(pid: int) -> set[int]:
    """The processes under ``pid``: its children, theirs, ... (from /proc)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    found: set[int] = set()
    while new := {p for p, pp in parent.items() if (pp == pid or pp in found) and p not in found}:
        found |= new
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    return out


def test_up_owns_its_folder_the_cli_finds_it_from_anywhere_and_kill_9_leaves_nothing(tmp_path: Path) -> None:
    env = _env(tmp_path, OUTPOST_TELEMETRY__METRICS_INTERVAL_S="0.5")
    data = _default_data(env)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = _up(env, tmp_path / "first", "--site", "shopA")
    try:
        assert wait_until(lambda: (r := read_run(data)) is not None and r.pid == first.pid, 60), first.stdout
        run = read_run(data)
        assert run is not None and run.live and run.site == "shopA"
        # the CLI in another folder, given nothing, finds the site and its broker through the run file
        assert wait_until(lambda: _online(env, elsewhere), 90)

        # a second `up` on the folder is refused, naming the first one's PID; it changes nothing
        second = outpost("up", "--site", "shopB", env=env, cwd=elsewhere, timeout=60)
        assert second.returncode == 2 and f"PID {first.pid}" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        assert read_run(data) == run

        # status: legible at 80 columns, and --json with all of it
        st = _status({**env, "COLUMNS": "80"}, elsewhere, "--json")
        assert st.returncode == 0, st.stderr
        lines = st.stdout.rstrip("\n").splitlines()
        assert all(len(line) <= 80 for line in lines[:-1]), st.stdout
        table = "\n".join(lines[:-1])
        assert all(name in table for name in SERVICES) and "uplink: none" in table
        doc = orjson.loads(lines[-1])
        assert doc["site"] == "shopA" and doc["broker"] == run.broker
        assert "run file" in doc["where"]["broker_from"] and "run file" in doc["where"]["site_from"]
        assert {n: s["health"] for n, s in doc["services"].items()} == dict.fromkeys(SERVICES, "ok")
        assert doc["uplink"] == {"up": None, "sync": "off", "backlog": {}}
        assert set(doc["dlq"]) <= SERVICES

        # --data-dir and --site are accepted before or after the subcommand, the same for every one
        for args in (
            ["--data-dir", str(data), "--site", "shopA", "model", "list", "--json"],
            ["model", "--data-dir", str(data), "list", "--json"],
            ["model", "list", "--json", "--site", "shopA", "--data-dir", str(data)],
            ["model", "list", "--json"],
        ):
            p = outpost(*args, env=env, cwd=elsewhere)
            assert p.returncode == 0, (args, p.stderr)
            assert {m["name"] for m in orjson.loads(p.stdout.strip().splitlines()[-1])["models"]} >= {
                "fridge-anomaly"
            }

        # kill -9 of `outpost up`: its broker, the broker's watchdog and every service go with it
        family = _descendants(first.pid)
        assert len(family) >= 6, family  # mosquitto, its watchdog, the zygote, three services
        titles = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] for pid in family if _alive(pid)]
        assert titles.count(b"outpost: zygote") == 1, titles  # the one the entry point started early
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
        assert wait_until(lambda: not any(_alive(p) for p in family), 60), [p for p in family if _alive(p)]
        stale = read_run(data)
        assert stale is not None and not stale.live and stale.pid == first.pid
        where = outpost("data", "where", env=env, cwd=elsewhere)
        assert f"left by PID {first.pid}, killed" in where.stdout, where.stdout
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(30)

    # the stale lock is no one's: a new `up` takes the folder and stops cleanly
    third = _up(env, tmp_path / "third", "--site", "shopA")
    try:
        assert wait_until(lambda: (r := read_run(data)) is not None and r.live and r.pid == third.pid, 60)
        assert wait_until(lambda: _online(env, elsewhere), 90)
    finally:
        out = _stop(third)
    assert third.returncode == 0, out
    assert "stopped cleanly" in out and read_run(data) is None


def test_up_against_no_broker_or_a_refusing_one_fails_at_once_with_exit_2(tmp_path: Path) -> None:
    env = _env(tmp_path)
    data = tmp_path / "data"
    p = outpost("up", "--broker", f"127.0.0.1:{free_port()}", "--data-dir", str(data), env=env, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.strip().startswith("error: no MQTT broker at 127.0.0.1:")
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert "Outpost site" not in p.stdout  # nothing said it was running
    assert not (data / "sites").exists() and read_run(data) is None  # no service started
    DataDirLock(data).acquire().release()  # and the folder is free again

    with Mosquitto(tmp_path / "auth", users={"operator": "s3cret-pw"}) as locked:
        p = outpost("up", "--broker", locked.address, "--data-dir", str(data), env=env, timeout=60)
    assert p.returncode == 2 and "refused the connection" in p.stderr, p.stderr
    assert "Not authorized" in p.stderr and "Traceback" not in p.stderr


def test_two_sites_in_turn_in_one_data_folder_share_no_state(
    settings: OutpostSettings, broker: Mosquitto, tmp_path: Path
) -> None:
    """The second site's devices count their seq from 0 too: none of it is a duplicate, and each
    site's log holds only its own."""
    settings.memory.text_embeddings = False
    sites = [settings.model_copy(update={"site": settings.site + s}) for s in ("a", "b")]
    for s in sites:
        t = s.topics
        events = Collector(s.mqtt, t.all_events, client_id=f"ev-{s.site}").start()
        dlq = Collector(s.mqtt, t.all_dlq, client_id=f"dlq-{s.site}").start()
        ingest = ServiceThread(run_ingest, s).start()
        memory = ServiceThread(run_memory, s).start()
        try:
            wait_status(s, "ingest")
            wait_status(s, "memory")
            body = orjson.dumps([make_reading("fridge-1", seq) for seq in range(20)])
            pub = Bus(s.mqtt, client_id=f"pub-{s.site}")
            pub.start()
            pub.publish(t.telemetry("fridge-1"), body, qos=1)
            pub.stop()
            assert events.wait_for(lambda c: len(c.events()) == 20), dlq.json()
        finally:
            ingest.stop()
            memory.stop()
            events.stop()
            dlq.stop()
        assert [d["reason"] for d in dlq.json()] == []
        log = OpLog(site_path(s.data_dir, s.site, "memory", "oplog.db"), synchronous="NORMAL")
        topics = {e.topic.split("/")[2] for e in log.read(0, limit=1000)}
        assert topics == {s.site}, topics
        log.close()
    a, b = sites
    assert (
        site_path(a.data_dir, a.site, "ingest.db").is_file()
        and site_path(b.data_dir, b.site, "ingest.db").is_file()
    )

    # the model registry is the site's too: an activation on one leaves the other as it was
    for s in sites:
        Registry(PACKAGED_MODELS, site_path(s.data_dir, s.site, "inference", "registry.db")).close()
    env = _env(tmp_path, OUTPOST_DATA_DIR=str(settings.data_dir))
    p = outpost("model", "activate", "fridge-anomaly", "1.0.0", "--site", a.site, env=env)
    assert p.returncode == 0 and a.site in p.stderr, p.stderr

    def active(site: str) -> Any:
        q = outpost("--site", site, "model", "list", "--json", env=env)
        rows = orjson.loads(q.stdout.strip().splitlines()[-1])["models"]
        return {r["version"] for r in rows if r["name"] == "fridge-anomaly" and r["active"]}

    assert active(a.site) == {"1.0.0"} and active(b.site) == {"1.1.0"}


def test_commands_that_find_nothing_say_where_they_looked_and_create_nothing(
    tmp_path: Path, broker: Mosquitto
) -> None:
    env = _env(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    p = outpost("model", "list", "--data-dir", str(empty), env=env, cwd=tmp_path)
    assert p.returncode == 2 and "no model registry for site 'site1'" in p.stderr, p.stderr
    assert str(site_path(empty, "site1", "inference", "registry.db")) in p.stderr
    assert list(empty.iterdir()) == [] and "Traceback" not in p.stderr
    p = outpost("log", "tail", "--data-dir", str(empty), env=env, cwd=tmp_path)
    assert p.returncode == 2 and "no operational log for site" in p.stderr and list(empty.iterdir()) == []

    # a broker where nothing of the site reports: where it looked, what to try, exit 1
    p = outpost(
        "status", "--broker", broker.address, "--site", "nowhere", "--wait", "1", env=env, cwd=tmp_path
    )
    assert p.returncode == 1, p.stdout + p.stderr
    said = " ".join(p.stderr.split())
    assert (
        f"nothing reports on site 'nowhere' (from --site) at broker {broker.address} (from --broker)" in said
    )
    assert "Try --site" in said and "outpost data where" in said
    p = outpost("status", "--broker", f"127.0.0.1:{free_port()}", env=env, cwd=tmp_path)
    assert p.returncode == 2 and "no broker at" in p.stderr and "outpost up" in p.stderr

    # flags are flags: no value in their help
    for args in (["status", "--help"], ["log", "replay", "--help"], ["--help"]):
        assert "<bool>" not in outpost(*args, env={**env, "COLUMNS": "80"}).stdout


def test_a_folder_of_the_older_layout_is_refused_by_up_until_migrated(tmp_path: Path) -> None:
    env = _env(tmp_path)
    old = tmp_path / "old"
    (old / "memory").mkdir(parents=True)
    (old / "memory" / "oplog.db").write_bytes(b"an older site's log")
    (old / "ingest.db").write_bytes(b"an older site's seq state")
    p = outpost("up", "--data-dir", str(old), env=env)
    assert p.returncode == 2 and f"outpost data migrate --data-dir {old} --site NAME" in p.stderr, p.stderr
    assert not (old / "sites").exists() and read_run(old) is None
    p = outpost("data", "migrate", "--site", "shop12", "--data-dir", str(old), env=env)
    assert p.returncode == 0, p.stderr
    assert site_path(old, "shop12", "ingest.db").read_bytes() == b"an older site's seq state"
    assert site_path(old, "shop12", "memory", "oplog.db").is_file() and not (old / "ingest.db").exists()


def test_log_shows_one_shape_per_entry_and_the_reason_of_a_dead_letter(tmp_path: Path) -> None:
    env = _env(tmp_path)
    data = tmp_path / "data"
    topic = "outpost/v1/shop12/events/fridge-1"
    one = {"id": "e1", "device": "fridge-1", "value": 1}
    two = [{"id": "e2", "device": "fridge-1", "value": 2}]  # a message of one event, as it came
    dead = {"stage": "ingest", "reason": "unknown_unit", "detail": "unit 'furlong' is not known"}
    log = OpLog(site_path(data, "shop12", "memory", "oplog.db"))
    log.append(
        [
            Record(1, "event", "e1", topic, orjson.dumps(one)),
            Record(2, "event", "e2", topic, orjson.dumps(two)),
            Record(3, "dlq", "t3", "outpost/v1/shop12/dlq/ingest", orjson.dumps(dead)),
        ]
    )
    log.close()
    p = outpost("--data-dir", str(data), "log", "replay", "--json", "--kind", "event", env=env)
    assert p.returncode == 0, p.stderr
    assert [orjson.loads(line)["body"] for line in p.stdout.splitlines()] == [one, two[0]]
    p = outpost("log", "tail", "--kind", "dlq", "--site", "shop12", "--data-dir", str(data), env=env)
    assert p.returncode == 0 and "ingest: unknown_unit: unit 'furlong'" in p.stdout, p.stdout


def test_a_service_that_cannot_start_says_why_even_without_a_log_file(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "logs"
    not_a_folder.write_text("a file where the log folder should be")
    sup = Supervisor(
        env={"OUTPOST_NO_SUCH_SETTING": "1"},
        log_dir=not_a_folder,
        services={"ingest": "outpost.services.ingest"},
    )
    sup.start()
    try:
        assert wait_until(lambda: sup.children["ingest"].last_exit == 2, 60)
        row = sup.status()[0]
    finally:
        sup.stop()
    assert "unknown setting in environment: OUTPOST_NO_SUCH_SETTING" in str(row["reason"]), row
    assert "cannot be written" in str(row["log_error"]), row


def test_up_shows_why_a_service_stops_even_when_its_log_cannot_be_written(tmp_path: Path) -> None:
    env = _env(tmp_path, OUTPOST_INFERENCE__MODELS='["no-such-model"]', OUTPOST_SITE="shopF")
    data = tmp_path / "data"
    site_path(data, "shopF").mkdir(parents=True)
    site_path(data, "shopF", "logs").write_text("a file where the logs folder should be")
    up = _up(env, tmp_path, "--data-dir", str(data))
    try:
        assert wait_until(lambda: (r := read_run(data)) is not None and r.pid == up.pid, 60)
        # inference refuses its settings and exits 2, again and again; the others run
        assert wait_until(lambda: _online_services(env, data) >= {"ingest", "memory"}, 90)
    finally:
        out = _stop(up)
    assert up.returncode == 1, out
    summary = out[out.index("stopped, not cleanly") :]
    said = " ".join(summary.split())
    # exit 2, or -15 when the stop caught a restart before it could say it again: the line is the same
    assert re.search(r"inference: exit (2|-15): error: inference.models names \['no-such-model'\]", said), (
        summary
    )
    assert "cannot be written" in said and "ingest: exit 0" in said


def _online_services(env: dict[str, str], data: Path) -> set[str]:
    p = _status(env, data, "--json", "--data-dir", str(data))
    if p.returncode != 0:
        return set()
    doc = orjson.loads(p.stdout.strip().splitlines()[-1])
    return {n for n, s in doc["services"].items() if s["state"] == "online"}
