"""A bug inside ingest must not lose a reading silently: the message is dead-lettered as `internal`
with its bytes, and ingest goes on. The fault is injected by making the unit table raise for one
unit, which is how a real bug in the hot path would show up."""

from __future__ import annotations

import base64
from collections.abc import Callable

import orjson
import pytest

from outpost.bus import Bus
from outpost.services.ingest import service as ingest_service
from outpost.services.ingest.units import UNITS
from outpost.services.registry import OutpostSettings
from tests.conftest import Collector, ServiceThread, make_reading, wait_status

pytestmark = pytest.mark.integration


class _ExplodingUnits(dict[str, tuple[str, float, float]]):
    def __getitem__(self, unit: str) -> tuple[str, float, float]:
        if unit == "kWh":
            raise RuntimeError("injected fault")
        return super().__getitem__(unit)


def test_a_failing_message_is_dead_lettered_and_ingest_lives_on(
    settings: OutpostSettings,
    monkeypatch: pytest.MonkeyPatch,
    publisher: Bus,
    collect: Callable[..., Collector],
) -> None:
    monkeypatch.setattr(ingest_service, "UNITS", _ExplodingUnits(UNITS))
    events = collect(settings.topics.all_events)
    dlq = collect(settings.topics.dlq("ingest"))
    running = ServiceThread(ingest_service.run, settings).start()
    try:
        # its durable session is new: what is published before it has subscribed is lost, so wait
        # for its online status (published after its SUBSCRIBE), not a fixed time
        wait_status(settings, "ingest")
        topic = settings.topics.telemetry("meter-1")
        bad = orjson.dumps(make_reading("meter-1", 1, metric="energy", value=2.0, unit="kWh"))
        publisher.publish(topic, bad, qos=1)
        publisher.publish(
            topic, orjson.dumps(make_reading("meter-1", 2, metric="power", value=5.0, unit="kW")), qos=1
        )
        assert dlq.wait_for(lambda c: len(c.json()) == 1, 30)
        entry = dlq.json()[0]
        assert entry["reason"] == "internal"
        assert "injected fault" in entry["detail"]
        assert base64.b64decode(entry["payload_b64"]) == bad
        assert events.wait_for(lambda c: any(e["seq"] == 2 for e in c.events()), 30)
    finally:
        svc = running.stop()
    assert svc.metrics.counters["rejected.internal"] == 1
