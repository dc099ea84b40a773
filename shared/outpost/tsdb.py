"""Start and stop a VictoriaMetrics of our own: the time-series server that tests, the demo and the
telemetry benchmark write to, as :mod:`outpost.broker` starts Mosquitto.

Why VictoriaMetrics (docs/telemetry.md, "The store"): the telemetry service writes through
influxdb-client's v2 write API, and Debian's ``victoria-metrics`` (1.79) takes ``/api/v2/write``
line protocol and reads every point back through ``/api/v1/export``, from one static binary with no
setup; Debian's InfluxDB (1.6.7) answers 404 on ``/api/v2/write``. A site runs InfluxDB 2 (compose/)
with the same client code. VictoriaMetrics stores field ``f`` of measurement ``m`` as series
``m_f`` with the point's tags as labels (it keeps no bucket: one server, one bucket).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from outpost.broker import free_port, port_open
from outpost.errors import OutpostError
from outpost.process import die_with_parent, end_process

BINARY = "victoria-metrics"


class TsdbError(OutpostError):
    """The time-series server could not be started or read."""


@dataclass
class VictoriaMetrics:
    """A VictoriaMetrics process listening on loopback, its data and log in ``workdir``."""

    workdir: Path
    port: int = 0
    host: str = "127.0.0.1"
    binary: str = BINARY
    die_with_parent: bool = False
    """Stopped (SIGTERM) when the process that started it dies, even by kill -9: the demo's and the
    benchmark's own server must not outlive them."""
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        if not self.port:
            self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "victoria-metrics.log"

    def start(self, timeout_s: float = 20.0) -> VictoriaMetrics:
        """Start it (data kept in ``workdir/data`` across a restart) and wait until it answers."""
        binary = shutil.which(self.binary)
        if binary is None:
            raise TsdbError(f"{self.binary} not found: install the Debian package 'victoria-metrics'")
        if self.running:
            return self
        if port_open(self.host, self.port):
            raise TsdbError(f"{self.host}:{self.port} is already in use by another process")
        self.workdir.mkdir(parents=True, exist_ok=True)
        logf = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                binary,
                f"-httpListenAddr={self.host}:{self.port}",
                f"-storageDataPath={self.workdir / 'data'}",
                "-retentionPeriod=100y",  # points spooled long ago keep their timestamps
                "-search.latencyOffset=0s",  # a point is readable at once (tests read back)
                "-search.disableCache",
                "-loggerLevel=WARN",
                "-memory.allowedPercent=20",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(os.getpid()) if self.die_with_parent else None,  # noqa: PLW1509 - one prctl call
        )
        logf.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise TsdbError(f"victoria-metrics exited with {self.proc.returncode}: {tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise TsdbError(f"victoria-metrics did not answer on {self.url} within {timeout_s}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: it flushes what it holds in memory to disk and exits."""
        if self.proc is not None:
            end_process(self.proc, timeout_s)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the store gone at once (what the telemetry service must spool through)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> VictoriaMetrics:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # --- reading ---------------------------------------------------------------------------------
    def _get(self, path: str, params: dict[str, str] | None = None) -> bytes:
        q = ("?" + urllib.parse.urlencode(params)) if params else ""
        try:
            with urllib.request.urlopen(self.url + path + q, timeout=10) as r:
                return bytes(r.read())
        except OSError as exc:
            raise TsdbError(f"cannot read {path} from victoria-metrics: {exc}") from exc

    def flush(self) -> None:
        """Make what was written searchable now (``/internal/force_flush``)."""
        self._get("/internal/force_flush")

    def export(self, match: str) -> list[dict[str, Any]]:
        """Every series matching the selector ``match`` (e.g. ``{__name__=~"readings_.*"}``) with
        all its points: ``[{"metric": {labels}, "values": [...], "timestamps": [ms, ...]}]``."""
        self.flush()
        body = self._get("/api/v1/export", {"match[]": match, "start": "0"})
        return [orjson.loads(line) for line in body.splitlines() if line.strip()]

    def bytes_received(self) -> int:
        """Bytes the server has read from its TCP connections so far (its own
        ``vm_tcplistener_read_bytes_total``): the bytes on the wire into the store, HTTP included."""
        total = 0
        for line in self._get("/metrics").decode().splitlines():
            if line.startswith("vm_tcplistener_read_bytes_total"):
                total += int(float(line.rsplit(" ", 1)[1]))
        return total
