"""`outpost up`'s machinery: our own broker plus supervised services, restarted after a crash."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from outpost.broker import port_open
from outpost.datadir import site_path
from outpost.errors import ConfigError
from outpost.monitor import SiteMonitor
from outpost.services.registry import OutpostSettings
from outpost.stack import Stack, parse_broker

pytestmark = pytest.mark.integration


def _wait(pred: object, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_a_killed_service_is_restarted_counted_and_everything_stops(tmp_path: Path, site: str) -> None:
    data = tmp_path / "site"
    data.mkdir()
    data.chmod(0o755)
    settings = OutpostSettings(site=site, data_dir=data)
    stack = Stack(settings)
    stack.start()
    try:
        assert stack.broker is not None and stack.supervisor is not None
        mon = SiteMonitor(settings.mqtt, settings.topics, client_id=f"mon-{site}", watch_events=False).start()
        assert _wait(lambda: mon.status.get("ingest", {}).get("state") == "online")
        first_pid = stack.supervisor.children["ingest"].pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        # the last will says offline, then the supervisor brings it back and counts it
        assert _wait(
            lambda: stack.supervisor is not None and stack.supervisor.children["ingest"].restarts == 1
        )
        assert _wait(
            lambda: (
                mon.status.get("ingest", {}).get("state") == "online"
                and mon.status["ingest"].get("pid") not in (None, first_pid)
            )
        )
        rows = {r["service"]: r for r in stack.supervisor.status()}
        assert set(rows) == {"ingest", "inference", "memory", "agents", "connectors", "telemetry", "uplink"}
        row = rows["ingest"]
        assert row["state"] == "running" and row["restarts"] == 1 and row["last_exit"] == -signal.SIGKILL
        assert rows["inference"]["restarts"] == rows["memory"]["restarts"] == 0  # the others run on
        mon.stop()
    finally:
        address = stack.broker_address
        stack.stop()
    host, port = parse_broker(address)
    assert not port_open(host, port), "the broker the stack started must be stopped"
    logs = site_path(data, site, "logs")
    assert (logs / "ingest.log").read_text()
    assert (logs / "inference.log").exists()


@pytest.mark.parametrize("bad", ["localhost", "host:", ":1883", "host:99999", "host:abc"])
def test_broker_address_must_be_host_and_port(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_broker(bad)
