"""An asyncio face on :class:`outpost.bus.Bus`, for services written with ``async``.

The network work stays on the bus's thread (paho, measured 4x faster than aiomqtt here: see
docs/bus.md); messages cross into the event loop through ``call_soon_threadsafe``, and a QoS 1
publish returns a future that resolves when the broker acknowledges it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from outpost.bus import Bus, Message


class AsyncBus:
    def __init__(self, bus: Bus, *, queue_size: int = 10_000) -> None:
        """``queue_size`` bounds the messages waiting for the event loop; when it is full the
        network thread stops reading (TCP backpressure) instead of growing memory."""
        self.bus = bus
        self._queue_size = queue_size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._acks: dict[int, asyncio.Future[None]] = {}
        bus.add_publish_listener(self._published)

    async def start(self, wait_s: float = 10.0) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.bus.start, wait_s=wait_s)

    async def stop(self, drain_s: float = 5.0) -> None:
        await asyncio.to_thread(self.bus.stop, drain_s=drain_s)

    def subscribe(self, pattern: str, *, qos: int = 1) -> AsyncIterator[Message]:
        """Messages matching ``pattern``, in arrival order. Call before :meth:`start` or after."""
        queue: asyncio.Queue[Message] = asyncio.Queue(self._queue_size)

        def deliver(msg: Message) -> None:
            loop = self._loop
            if loop is None:
                return
            fut = asyncio.run_coroutine_threadsafe(queue.put(msg), loop)
            with contextlib.suppress(Exception):
                fut.result(timeout=60)  # blocks the network thread while the queue is full

        self.bus.subscribe(pattern, deliver, qos=qos)

        async def messages() -> AsyncIterator[Message]:
            while True:
                yield await queue.get()

        return messages()

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish; with QoS 1, return once the broker has acknowledged the message."""
        loop = asyncio.get_running_loop()
        if qos == 0:
            self.bus.publish(topic, payload, qos=0, retain=retain)
            return
        fut: asyncio.Future[None] = loop.create_future()
        mid = self.bus.publish(topic, payload, qos=qos, retain=retain)
        self._acks[mid] = fut
        if not self.bus.is_pending(mid):  # acknowledged before we registered the future
            self._acks.pop(mid, None)
            return
        await fut

    def _published(self, mid: int) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
