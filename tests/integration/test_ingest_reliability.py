"""Reliability of ingest run as a real process (``python -m outpost.services.ingest``) against a real
Mosquitto with persistence: kill -9 and broker restarts mid-stream lose nothing and never give one
(device, seq) two ids; replays never come out twice; SIGTERM drains; the last will says offline."""

from __future__ import annotations

import base64
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from outpost.broker import Mosquitto
from outpost.bus import Bus
from outpost.contracts import reading_id
from outpost.services.registry import OutpostSettings
from tests.conftest import Collector, ServiceProcess, make_reading

pytestmark = pytest.mark.integration

WAIT = 60.0
DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d")


class IngestProcess(ServiceProcess):
    """``python -m outpost.services.ingest`` configured only through the fixed environment names."""

    def __init__(self, settings: OutpostSettings, workdir: Path) -> None:
        env = {
            "OUTPOST_SITE": settings.site,
            "OUTPOST_DATA_DIR": str(settings.data_dir),
            "OUTPOST_MQTT__PORT": str(settings.mqtt.port),
            "OUTPOST_INGEST__QOS": "1",
            "OUTPOST_TELEMETRY__METRICS_INTERVAL_S": "0.5",
        }
        super().__init__("outpost.services.ingest", "ingest", env, workdir)


@pytest.fixture
def ingest_proc(settings: OutpostSettings, broker: Mosquitto, tmp_path: Path) -> Iterator[IngestProcess]:
    p = IngestProcess(settings, tmp_path / "ingest-run")
    yield p
    p.close()


def wait_state(status: Collector, state: str, pid: int | None = None, timeout: float = WAIT) -> None:
    def seen(c: Collector) -> bool:
        return any(d.get("state") == state and (pid is None or d.get("pid") == pid) for d in c.json())

    assert status.wait_for(seen, timeout), f"no status {state!r} (pid {pid}): {status.json()}"


def start_and_wait(ingest: IngestProcess, status: Collector) -> None:
    proc = ingest.start()
    try:
        wait_state(status, "online", proc.pid)
    except AssertionError:
        raise AssertionError(f"ingest did not come online:\n{ingest.logs()}") from None


class Stream:
    """Publishes readings for DEVICES at QoS 1 from a thread, spread over a couple of seconds."""

    def __init__(self, pub: Bus, settings: OutpostSettings, per_device: int, *, every: int = 20) -> None:
        self.pub = pub
        self.topics = settings.topics
        self.per_device = per_device
        self.every = every
        self.sent = 0
        self.readings: dict[tuple[str, int], bytes] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def expected(self) -> set[tuple[str, int]]:
        return {(d, s) for d in DEVICES for s in range(self.per_device)}

    def _run(self) -> None:
        base = time.time_ns()
        for seq in range(self.per_device):
            for i, device in enumerate(DEVICES):
                raw = orjson.dumps(make_reading(device, seq, ts=base + seq * 1000 + i, value=float(seq)))
                self.readings[(device, seq)] = raw
                self.pub.publish(self.topics.telemetry(device), raw, qos=1)
                self.sent += 1
            if seq % self.every == 0:
                time.sleep(0.01)

    def start(self) -> Stream:
        self.thread.start()
        return self

    def join(self) -> None:
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        assert self.pub.drain(WAIT), "the broker did not acknowledge every reading"


def ids_by_reading(events: Collector) -> dict[tuple[str, int], list[str]]:
    out: dict[tuple[str, int], list[str]] = defaultdict(list)
    for e in events.events():
        out[(e["device"], e["seq"])].append(e["id"])
    return out


def assert_all_once_in_effect(
    events: Collector, settings: OutpostSettings, expected: set[tuple[str, int]], ingest: IngestProcess
) -> dict[tuple[str, int], list[str]]:
    """Every expected reading came out, and every copy of one carries the one deterministic id."""

    def complete(c: Collector) -> bool:
        return expected <= set(ids_by_reading(c))

    if not events.wait_for(complete, WAIT):
        missing = sorted(expected - set(ids_by_reading(events)))
        raise AssertionError(f"{len(missing)} readings never came out, e.g. {missing[:10]}\n{ingest.logs()}")
    got = ids_by_reading(events)
    assert set(got) == expected, f"unexpected readings: {sorted(set(got) - expected)[:10]}"
    for (device, seq), ids in got.items():
        assert set(ids) == {reading_id(settings.site, device, seq)}, (device, seq, ids)
    return got


@pytest.fixture
def outputs(collect: Callable[..., Collector], settings: OutpostSettings) -> tuple[Collector, ...]:
    """Durable QoS 1 collectors for events and dead letters, and one for ingest's status."""
    t = settings.topics
    events = collect(t.all_events, durable=True)
    dlq = collect(t.dlq("ingest"), durable=True)
    status = collect(t.service_status("ingest"))
    return events, dlq, status


def test_kill_9_mid_stream_loses_nothing(
    settings: OutpostSettings,
    publisher: Bus,
    ingest_proc: IngestProcess,
    outputs: tuple[Collector, Collector, Collector],
) -> None:
    events, dlq, status = outputs
    start_and_wait(ingest_proc, status)
    stream = Stream(publisher, settings, per_device=1000).start()
    assert events.wait_for(lambda c: len(c.events()) >= 800, WAIT), ingest_proc.logs()
    ingest_proc.kill()  # mid-stream: the stream thread keeps publishing
    assert stream.thread.is_alive() or stream.sent == 4000
    start_and_wait(ingest_proc, status)
    stream.join()
    got = assert_all_once_in_effect(events, settings, stream.expected, ingest_proc)
    twice = sum(1 for ids in got.values() if len(ids) > 1)
    print(f"kill -9: {len(got)} readings, {twice} came out more than once (same id)")
    # nothing of a clean stream is ever dead-lettered, redelivered or not
    assert dlq.json() == []


def test_broker_restart_mid_stream_loses_nothing(
    settings: OutpostSettings,
    broker: Mosquitto,
    publisher: Bus,
    ingest_proc: IngestProcess,
    outputs: tuple[Collector, Collector, Collector],
) -> None:
    events, dlq, status = outputs
    start_and_wait(ingest_proc, status)
    stream = Stream(publisher, settings, per_device=1000).start()
    assert events.wait_for(lambda c: len(c.events()) >= 800, WAIT), ingest_proc.logs()
    broker.restart()  # SIGTERM: Mosquitto saves sessions and queued messages, then starts again
    assert publisher.wait_connected(WAIT)
    stream.join()
    assert_all_once_in_effect(events, settings, stream.expected, ingest_proc)
    # a reading the publisher re-sent across the restart may reach ingest twice: the copy is
    # dead-lettered as a duplicate, never emitted again
    assert {d["reason"] for d in dlq.json()} <= {"duplicate"}
    assert ingest_proc.proc is not None
    assert ingest_proc.proc.poll() is None
    wait_state(status, "online", ingest_proc.proc.pid)


def test_replayed_reading_never_comes_out_twice(
    settings: OutpostSettings,
    publisher: Bus,
    ingest_proc: IngestProcess,
    outputs: tuple[Collector, Collector, Collector],
) -> None:
    events, dlq, status = outputs
    start_and_wait(ingest_proc, status)
    stream = Stream(publisher, settings, per_device=50).start()
    stream.join()
    assert_all_once_in_effect(events, settings, stream.expected, ingest_proc)
    n = len(stream.expected)
    topics = settings.topics

    def replay_all() -> None:
        for (device, _seq), raw in stream.readings.items():
            publisher.publish(topics.telemetry(device), raw, qos=1)
        assert publisher.drain(WAIT)

    def duplicates(c: Collector) -> list[dict[str, Any]]:
        return [d for d in c.json() if d["reason"] == "duplicate"]

    replay_all()
    assert dlq.wait_for(lambda c: len(duplicates(c)) >= n, WAIT)
    # after a clean restart the dedup state comes back from SQLite
    assert ingest_proc.terminate() == 0
    start_and_wait(ingest_proc, status)
    replay_all()
    assert dlq.wait_for(lambda c: len(duplicates(c)) >= 2 * n, WAIT)
    got = ids_by_reading(events)
    assert set(got) == stream.expected
    assert all(len(ids) == 1 for ids in got.values()), "a replayed reading came out twice"
    for entry in duplicates(dlq):
        reading = orjson.loads(base64.b64decode(entry["payload_b64"]))
        assert entry["trace"] == reading_id(settings.site, reading["device"], reading["seq"])


def test_sigterm_drains_cleanly(
    settings: OutpostSettings,
    publisher: Bus,
    ingest_proc: IngestProcess,
    outputs: tuple[Collector, Collector, Collector],
    collect: Callable[..., Collector],
) -> None:
    events, dlq, status = outputs
    start_and_wait(ingest_proc, status)
    stream = Stream(publisher, settings, per_device=1000).start()
    assert events.wait_for(lambda c: len(c.events()) >= 800, WAIT), ingest_proc.logs()
    assert ingest_proc.terminate() == 0, ingest_proc.logs()
    # the retained status a newcomer sees says stopped
    late = collect(settings.topics.service_status("ingest"))
    wait_state(late, "stopped")
    assert late.json()[-1]["state"] == "stopped"
    # what was sent while ingest was down waited in its durable session
    start_and_wait(ingest_proc, status)
    stream.join()
    got = assert_all_once_in_effect(events, settings, stream.expected, ingest_proc)
    # a clean stop acknowledges everything it emitted: nothing comes out twice
    assert all(len(ids) == 1 for ids in got.values())
    assert dlq.json() == []


def test_last_will_says_offline_after_kill_9(
    settings: OutpostSettings,
    ingest_proc: IngestProcess,
    outputs: tuple[Collector, Collector, Collector],
    collect: Callable[..., Collector],
) -> None:
    _events, _dlq, status = outputs
    start_and_wait(ingest_proc, status)
    assert ingest_proc.proc is not None
    pid = ingest_proc.proc.pid
    ingest_proc.kill()
    wait_state(status, "offline", pid)
    late = collect(settings.topics.service_status("ingest"))
    wait_state(late, "offline", pid)
    [retained] = late.json()
    assert retained["state"] == "offline"
    assert retained["reason"] == "connection lost"
