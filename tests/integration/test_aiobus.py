"""The asyncio face of the bus against a real Mosquitto."""

from __future__ import annotations

import asyncio

import pytest

from outpost.aiobus import AsyncBus
from outpost.bus import Bus
from outpost.services.registry import OutpostSettings

pytestmark = pytest.mark.integration


def test_async_publish_waits_for_ack_and_subscriber_receives_in_order(settings: OutpostSettings) -> None:
    topic = f"{settings.topics.root}/test/aiobus"

    async def main() -> list[bytes]:
        sub = AsyncBus(Bus(settings.mqtt, client_id=f"aiosub-{settings.site}"))
        messages = sub.subscribe(topic, qos=1)
        await sub.start()
        pub = AsyncBus(Bus(settings.mqtt, client_id=f"aiopub-{settings.site}"))
        await pub.start()
        for i in range(200):
            await pub.publish(topic, b"%d" % i, qos=1)
        assert pub.bus.pending == 0
        got = []
        async for msg in messages:
            got.append(bytes(msg.payload))
            if len(got) == 200:
                break
        await pub.stop()
        await sub.stop()
        return got

    got = asyncio.run(asyncio.wait_for(main(), 30))
    assert got == [b"%d" % i for i in range(200)]
