"""Memory on a full disk, against a real Mosquitto and a real 20 MB file system (tmpfs, mounted
as root; skipped, saying why, where mounting is refused): the full disk is reported in the
retained status, nothing is acknowledged while the log cannot be written, a kill -9 meanwhile
does not make memory crash-loop, and once space is freed the log resumes by itself with every
event published exactly once (docs/memory.md, "A full disk")."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from outpost.broker import Mosquitto
from outpost.bus import Bus
from outpost.datadir import site_path
from outpost.services.memory.client import MemoryClient, MemoryRequestError
from outpost.services.memory.oplog import OpLog
from outpost.services.registry import OutpostSettings
from tests.conftest import MB, Collector, ServiceProcess, fill, free, make_event, wait_until

pytestmark = pytest.mark.integration


def events_logged(data: Path, site: str) -> tuple[int, int]:
    """(distinct traces, entries) of kind event in the site's log."""
    path = site_path(data, site, "memory", "oplog.db")
    if not path.is_file():
        return (0, 0)
    log = OpLog(path, synchronous="NORMAL")
    try:
        row = log.db.execute(
            "SELECT count(DISTINCT trace), count(*) FROM log WHERE kind = 'event'"
        ).fetchone()
        return (int(row[0]), int(row[1]))
    finally:
        log.close()


def statuses(c: Collector) -> list[dict[str, Any]]:
    return [d for d in c.json() if isinstance(d, dict)]


def test_a_full_disk_is_reported_survived_and_recovered_from_with_nothing_lost_or_doubled(
    small_disk: Path, broker: Mosquitto, tmp_path: Path, site: str
) -> None:
    data = small_disk / "data"
    settings = OutpostSettings(site=site, data_dir=data)
    settings.mqtt.port = broker.port
    t = settings.topics
    env = {
        "OUTPOST_SITE": site,
        "OUTPOST_DATA_DIR": str(data),
        "OUTPOST_MQTT__PORT": str(broker.port),
        "OUTPOST_MEMORY__EMBEDDER_CACHE": os.environ["OUTPOST_MEMORY__EMBEDDER_CACHE"],
        "OUTPOST_DISK__WARN_FREE_MB": "2",
        "OUTPOST_DISK__CHECK_S": "0.5",
    }
    status = Collector(settings.mqtt, t.service_status("memory"), client_id="st-" + site).start()
    pub = Bus(settings.mqtt, client_id="pub-" + site)
    pub.start()
    memory = ServiceProcess("outpost.services.memory", "memory", env, tmp_path / "proc")
    memory.start()
    try:
        assert status.wait_for(lambda c: any(d.get("health") == "ok" for d in statuses(c)), 60), memory.logs()

        def publish(seqs: range) -> None:
            for i in seqs:
                pub.publish(t.events("d1"), orjson.dumps([make_event("d1", i, "t", float(i))]), qos=1)

        publish(range(0, 100))
        assert wait_until(lambda: events_logged(data, site) == (100, 100), 30)
        filler = fill(small_disk)
        publish(range(100, 300))  # each acknowledged by the broker, which now holds it for memory

        def degraded(c: Collector) -> bool:
            return any(
                d.get("health") == "degraded" and any(str(p).startswith("disk full") for p in d["problems"])
                for d in statuses(c)
            )

        assert status.wait_for(degraded, 60), (statuses(status)[-3:], memory.logs())
        assert events_logged(data, site)[0] < 300  # the disk is full: not everything could be written
        # kill -9 while the disk is full: memory comes back (degraded), no crash loop
        memory.kill()
        status.messages.clear()
        memory.start()
        assert status.wait_for(degraded, 60), (statuses(status)[-3:], memory.logs())
        assert memory.proc is not None and memory.proc.poll() is None, memory.logs()
        # free a little: the log resumes by itself, every event once, and the status clears
        status.messages.clear()
        free(filler, 6 * MB)
        assert wait_until(lambda: events_logged(data, site)[0] == 300, 120), (
            events_logged(data, site),
            memory.logs(),
        )
        assert events_logged(data, site) == (300, 300)
        assert status.wait_for(lambda c: any(d.get("health") == "ok" for d in statuses(c)), 60), statuses(
            status
        )[-3:]
        assert memory.terminate() == 0
        assert events_logged(data, site) == (300, 300)
    finally:
        memory.close()
        pub.stop()
        status.stop()


def test_a_data_folder_too_small_for_the_encoder_leaves_no_temporary_file_and_the_log_works(
    small_disk: Path, broker: Mosquitto, tmp_path: Path, site: str
) -> None:
    """The encoder's 90 MB graph is built under the data folder by default, at the first text
    request: on 20 MB the build fails (ENOSPC). That request is told why, its temporary file goes
    with it, memory says why it embeds no texts (degraded), and logs every event."""
    data = small_disk / "data"
    settings = OutpostSettings(site=site, data_dir=data)
    settings.mqtt.port = broker.port
    t = settings.topics
    env = {
        "OUTPOST_SITE": site,
        "OUTPOST_DATA_DIR": str(data),
        "OUTPOST_MQTT__PORT": str(broker.port),
        "OUTPOST_DISK__WARN_FREE_MB": "0",
    }
    status = Collector(settings.mqtt, t.service_status("memory"), client_id="st-" + site).start()
    pub = Bus(settings.mqtt, client_id="pub-" + site)
    pub.start()
    memory = ServiceProcess("outpost.services.memory", "memory", env, tmp_path / "proc")
    memory.start()
    try:
        assert status.wait_for(lambda c: any(d.get("state") == "online" for d in statuses(c)), 60)
        with MemoryClient(settings, "probe") as mem, pytest.raises(MemoryRequestError) as refused:
            mem.request("ltm-add", {"namespace": "n", "text": "the fridge door is open"}, timeout_s=120)
        assert refused.value.reason == "no_embedder" and "No space left" in refused.value.detail

        def no_encoder(c: Collector) -> bool:
            return any(
                d.get("health") == "degraded" and any("no text encoder" in str(p) for p in d["problems"])
                for d in statuses(c)
            )

        assert status.wait_for(no_encoder, 120), (statuses(status)[-3:], memory.logs())
        problems = next(d["problems"] for d in statuses(status) if d.get("health") == "degraded")
        assert not any(str(p).startswith("disk full") for p in problems), problems
        assert [p.name for p in (data / "memory" / "embedder").iterdir()] == [], "a temporary file was left"
        for i in range(200):
            pub.publish(t.events("d1"), orjson.dumps([make_event("d1", i, "t", float(i))]), qos=1)
        assert wait_until(lambda: events_logged(data, site) == (200, 200), 60), (
            events_logged(data, site),
            memory.logs(),
        )
        assert memory.terminate() == 0
    finally:
        memory.close()
        pub.stop()
        status.stop()
