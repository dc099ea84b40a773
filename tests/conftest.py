"""Fixtures: a real Mosquitto per test (own port, temp dir, own config), settings pointing at it,
ingest running in-process, and a collector that subscribes for real."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import orjson
import pytest

from outpost.broker import Mosquitto
from outpost.bus import Bus
from outpost.contracts import event_dict
from outpost.services.ingest.service import IngestService, run
from outpost.services.registry import OutpostSettings
from outpost.settings import MqttSettings


@pytest.fixture(scope="session", autouse=True)
def shared_embedder_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The text encoder's ONNX file is built once per test run (about 2 s and 90 MB), not once per
    memory service started: every service in the run, subprocesses too, reads it from here."""
    key = "OUTPOST_MEMORY__EMBEDDER_CACHE"
    old = os.environ.get(key)
    os.environ[key] = str(tmp_path_factory.mktemp("embedder"))
    yield
    if old is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = old


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path / "broker").start()
    yield m
    m.stop()


@pytest.fixture
def site(request: pytest.FixtureRequest) -> str:
    """A site id unique to the test, so tests never see each other's messages."""
    return "t" + str(abs(hash(request.node.nodeid)) % 10**10)


@pytest.fixture
def settings(broker: Mosquitto, tmp_path: Path, site: str) -> OutpostSettings:
    s = OutpostSettings(site=site, data_dir=tmp_path / "data")
    s.mqtt.port = broker.port
    s.telemetry.metrics_interval_s = 0.5
    return s


class Collector:
    """Subscribes with a real client and keeps what arrives, decoded."""

    def __init__(self, mqtt: MqttSettings, pattern: str, *, client_id: str, durable: bool = False) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.bus = Bus(mqtt, client_id=client_id, durable=durable)
        self.bus.subscribe(pattern, self._on, qos=1)

    def _on(self, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload))

    def start(self) -> Collector:
        self.bus.start(wait_s=30)  # returns once subscribed: what is published after it arrives
        return self

    def stop(self) -> None:
        self.bus.stop(drain_s=0)

    def json(self) -> list[Any]:
        with self.lock:
            return [orjson.loads(p) for _, p in self.messages]

    def events(self) -> list[dict[str, Any]]:
        """Flatten event batches (each events message is a JSON list of envelopes)."""
        out: list[dict[str, Any]] = []
        for doc in self.json():
            out.extend(doc if isinstance(doc, list) else [doc])
        return out

    def wait_for(self, pred: Callable[[Collector], bool], timeout: float = 30.0) -> bool:
        """Poll ``pred`` until it holds or ``timeout`` passes (generous: it returns as soon as the
        predicate holds, and CI machines are small and loaded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self):
                return True
            time.sleep(0.02)
        return pred(self)


def wait_until(pred: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``pred`` until it holds or ``timeout`` passes (generous: it returns as soon as the
    predicate holds, and CI machines are small and loaded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.fixture
def collect(settings: OutpostSettings) -> Iterator[Callable[..., Collector]]:
    made: list[Collector] = []

    def make(pattern: str, **kw: Any) -> Collector:
        c = Collector(settings.mqtt, pattern, client_id=f"collector-{len(made)}-{settings.site}", **kw)
        made.append(c.start())
        return c

    yield make
    for c in made:
        c.stop()


OUTPOST = [sys.executable, "-m", "outpost.cli.entry"]
"""The ``outpost`` command, run by the tests' own interpreter."""


def outpost(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``outpost ARGS`` to its end, as an operator would, output captured as text."""
    return subprocess.run(
        [*OUTPOST, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


S = TypeVar("S")


class ServiceThread(Generic[S]):
    """A service's ``run(settings, stop)`` on a thread of the test process: every service's tests
    run it in-process this way. ``stop()`` drains it and returns the stopped service."""

    def __init__(
        self, run: Callable[[OutpostSettings, threading.Event], S], settings: OutpostSettings
    ) -> None:
        self.stop_event = threading.Event()
        self.result: list[S] = []
        self.thread = threading.Thread(
            target=lambda: self.result.append(run(settings, self.stop_event)), daemon=True
        )

    def start(self) -> ServiceThread[S]:
        self.thread.start()
        return self

    def stop(self) -> S:
        self.stop_event.set()
        self.thread.join(30)
        return self.result[0]


RunningIngest = ServiceThread[IngestService]
_probes = itertools.count()


def wait_status(
    settings: OutpostSettings,
    service: str,
    *,
    pid: int | None = None,
    state: str = "online",
    timeout: float = 30.0,
) -> None:
    """Wait until ``service``'s retained status says ``state`` (from process ``pid``, if given).
    A service says online after it has subscribed, so what is published next reaches it."""
    probe = Collector(
        settings.mqtt,
        settings.topics.service_status(service),
        client_id=f"probe-{service}-{next(_probes)}-{settings.site}",
    ).start()
    try:
        assert probe.wait_for(
            lambda c: any(d.get("state") == state and pid in (None, d.get("pid")) for d in c.json()), timeout
        ), f"{service} never said {state}"
    finally:
        probe.stop()


@pytest.fixture
def ingest(settings: OutpostSettings, broker: Mosquitto) -> Iterator[RunningIngest]:
    r = ServiceThread(run, settings).start()
    wait_status(settings, "ingest")
    yield r
    if r.thread.is_alive():
        r.stop()


@pytest.fixture
def publisher(settings: OutpostSettings) -> Iterator[Bus]:
    b = Bus(settings.mqtt, client_id="pub-" + settings.site)
    b.start()
    yield b
    b.stop()


# --- additions for the ingest hostile-input and reliability suites ---------------------------------


@pytest.fixture
def start_ingest(settings: OutpostSettings, broker: Mosquitto) -> Iterator[Callable[[], RunningIngest]]:
    """Start ingest in-process once the test has adjusted ``settings`` (e.g. small limits)."""
    started: list[RunningIngest] = []

    def start() -> RunningIngest:
        r = ServiceThread(run, settings).start()
        started.append(r)
        wait_status(settings, "ingest")
        return r

    yield start
    for r in started:
        if r.thread.is_alive():
            r.stop()


def make_reading(device: str, seq: int, /, *, ts: int | None = None, **fields: Any) -> dict[str, Any]:
    """A valid reading, stamped now unless ``ts`` is given; ``fields`` override or add fields."""
    r: dict[str, Any] = {
        "device": device,
        "seq": seq,
        "ts": time.time_ns() if ts is None else ts,
        "metric": "temperature",
        "value": 21.5,
        "unit": "C",
    }
    r.update(fields)
    return r


def make_event(device: str, seq: int, metric: str, value: Any, **fields: Any) -> dict[str, Any]:
    """An event as ingest publishes it (id ``{device}-{seq}``, stamped now); ``fields`` override or
    add fields."""
    return event_dict(device, seq, metric, value, fields.pop("unit", "kg"), **fields)


def kill_9_after(script: str, arg: str, acked_at_least: int) -> int:
    """Run ``script`` (Python source) with ``arg``; it prints, one a line, the number of what it
    has committed. Once that reaches ``acked_at_least``, kill -9 it; the last number it printed."""
    proc = subprocess.Popen([sys.executable, "-c", script, arg], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acked = 0
    for line in proc.stdout:
        acked = int(line)
        if acked >= acked_at_least:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    return acked


class ServiceProcess:
    """A service run as a real process (``python -m MODULE``) configured only through the
    environment, its output kept a log file per run under ``workdir``."""

    def __init__(self, module: str, name: str, env: dict[str, str], workdir: Path) -> None:
        self.module = module
        self.name = name
        self.env = {k: v for k, v in os.environ.items() if not k.upper().startswith("OUTPOST_")} | env
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self._log: IO[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        self.runs += 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._log is not None:
            self._log.close()
        self._log = (self.workdir / f"{self.name}-{self.runs}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env=self.env,
            cwd=self.workdir,  # no outpost.yaml here
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self.proc

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-3000:] for p in sorted(self.workdir.glob(f"{self.name}-*.log"))
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        if self._log is not None:
            self._log.close()


# --- a disk that fills up ---------------------------------------------------------------------------
MB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MB file system of the test's own (tmpfs, mounted as root; skipped, saying why, where
    mounting is refused): a full disk made for real."""
    folder = tmp_path / "fs"
    folder.mkdir()
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if p.returncode != 0:
        pytest.skip(f"cannot mount a 20 MB tmpfs (needs root): {p.stderr.strip() or p.returncode}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Fill the file system to its last byte; the filler file."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (MB, 4096, 512):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                continue
    return filler


def free(filler: Path, nbytes: int) -> None:
    with filler.open("r+b") as f:
        f.truncate(max(0, filler.stat().st_size - nbytes))
