"""The shared MQTT bus against a real Mosquitto: reconnect and resubscribe after a broker restart,
QoS 1 publishes kept across an outage, shared subscriptions, publishes from many threads, and a
handler that raises."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from outpost.broker import Mosquitto
from outpost.bus import Bus, Message
from outpost.services.registry import OutpostSettings
from outpost.topics import shared
from tests.conftest import Collector, wait_until

pytestmark = pytest.mark.integration

WAIT = 30.0


@pytest.fixture
def buses(settings: OutpostSettings) -> Iterator[Callable[..., Bus]]:
    made: list[Bus] = []

    def make(name: str, **kw: object) -> Bus:
        b = Bus(settings.mqtt, client_id=f"{name}-{settings.site}", **kw)  # type: ignore[arg-type]
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop(drain_s=0)


def test_reconnects_and_resubscribes_after_broker_restart(
    settings: OutpostSettings, broker: Mosquitto, buses: Callable[..., Bus]
) -> None:
    topic = f"{settings.topics.root}/test/restart"
    got: list[bytes | bytearray] = []
    sub = buses("sub")  # a clean session: the subscription must be made again on reconnect
    sub.subscribe(topic, lambda m: got.append(m.payload), qos=1)
    sub.start()
    pub = buses("pub")
    pub.start()
    pub.publish(topic, b"before", qos=1)
    assert wait_until(lambda: got == [b"before"])

    broker.restart()
    assert wait_until(lambda: sub.stats()["connects"] >= 2 and sub.connected and pub.connected)
    # the subscriber's SUBSCRIBE goes out on connect; keep publishing until one arrives
    assert wait_until(lambda: bool(pub.publish(topic, b"after", qos=1)) and b"after" in got, WAIT)
    assert pub.stats()["connects"] >= 2


def test_qos1_publishes_made_while_the_broker_is_down_are_sent_after_reconnect(
    settings: OutpostSettings, broker: Mosquitto, collect: Callable[..., Collector], buses: Callable[..., Bus]
) -> None:
    topic = f"{settings.topics.root}/test/outage"
    sink = collect(topic, durable=True)  # its session survives the broker restart
    pub = buses("pub")
    pub.start()
    broker.stop()
    assert wait_until(lambda: not pub.connected)
    for i in range(100):
        pub.publish(topic, b"%d" % i, qos=1)
    assert pub.pending == 100
    broker.start()
    assert pub.drain(WAIT)
    assert sink.wait_for(lambda c: len(c.messages) >= 100, WAIT)
    assert sorted(int(p) for _, p in sink.messages) == list(range(100))


def test_qos0_publishes_while_disconnected_are_counted(
    settings: OutpostSettings, broker: Mosquitto, buses: Callable[..., Bus]
) -> None:
    pub = buses("pub")
    pub.start()
    broker.stop()
    assert wait_until(lambda: not pub.connected)
    for _ in range(5):
        pub.publish(f"{settings.topics.root}/test/q0", b"x", qos=0)
    assert pub.stats()["dropped_qos0"] == 5


def test_shared_subscription_splits_messages(settings: OutpostSettings, buses: Callable[..., Bus]) -> None:
    topic = f"{settings.topics.root}/test/shared"
    got: dict[str, list[bytes | bytearray]] = {"a": [], "b": []}
    lock = threading.Lock()

    def keep(name: str) -> Callable[[Message], None]:
        def handler(msg: Message) -> None:
            with lock:
                got[name].append(msg.payload)

        return handler

    for name in ("a", "b"):
        b = buses(f"member-{name}")
        b.subscribe(shared("workers", topic), keep(name), qos=1)
        b.start()
        # start() returns once the broker acknowledged the SUBSCRIBE: both members get a share
    pub = buses("pub")
    pub.start()
    n = 400
    for i in range(n):
        pub.publish(topic, b"%d" % i, qos=1)
    assert pub.drain(WAIT)
    assert wait_until(lambda: len(got["a"]) + len(got["b"]) >= n)
    time.sleep(0.2)  # nothing more arrives: each message went to exactly one member
    in_a, in_b = {int(p) for p in got["a"]}, {int(p) for p in got["b"]}
    assert len(got["a"]) + len(got["b"]) == n
    assert in_a | in_b == set(range(n))
    assert not in_a & in_b
    assert in_a and in_b, "both members of the group got a share"


def test_publishes_from_many_threads_are_all_delivered(
    settings: OutpostSettings, collect: Callable[..., Collector], buses: Callable[..., Bus]
) -> None:
    """Bus.publish is called from handlers, timers, the main thread, asyncio threads: every
    publish must reach the broker and be acknowledged, whichever thread made it."""
    topic = f"{settings.topics.root}/test/threads"
    sink = collect(topic)
    pub = buses("pub")
    pub.start()
    threads, per_thread = 4, 2000
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, as a busy machine would

    def burst(k: int) -> None:
        for i in range(per_thread):
            pub.publish(topic, b"%d" % (k * per_thread + i), qos=1)

    try:
        workers = [threading.Thread(target=burst, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(old)
    assert pub.drain(WAIT), f"{pub.pending} publishes never acknowledged"
    total = threads * per_thread
    assert sink.wait_for(lambda c: len(c.messages) >= total, WAIT), len(sink.messages)
    assert sorted(int(p) for _, p in sink.messages) == list(range(total))


def test_only_the_network_thread_writes_to_the_socket(
    settings: OutpostSettings, buses: Callable[..., Bus]
) -> None:
    """paho writes from the publishing thread unless told otherwise; with two writers at once
    packets are lost (a QoS 1 publish then never completes). Every write must come from the bus's
    own thread."""
    pub = buses("writer")
    pub.start()
    writers: set[str] = set()
    send = pub._client._sock_send

    def recording_send(data: bytes | bytearray) -> int:
        writers.add(threading.current_thread().name)
        return int(send(data))

    pub._client._sock_send = recording_send  # type: ignore[method-assign,assignment]
    topic = f"{settings.topics.root}/test/writer"
    for i in range(200):
        pub.publish(topic, b"%d" % i, qos=1 if i % 2 else 0)
    assert pub.drain(WAIT)
    assert writers == {f"bus-writer-{settings.site}"}


def test_handler_that_raises_does_not_stop_the_bus(
    settings: OutpostSettings, buses: Callable[..., Bus]
) -> None:
    topic = f"{settings.topics.root}/test/raises"
    got: list[bytes | bytearray] = []

    def handler(msg: Message) -> None:
        if msg.payload == b"boom":
            raise RuntimeError("handler bug")
        got.append(msg.payload)

    sub = buses("sub")
    sub.subscribe(topic, handler, qos=1)
    sub.start()
    pub = buses("pub")
    pub.start()
    for payload in (b"one", b"boom", b"two"):
        pub.publish(topic, payload, qos=1)
    assert wait_until(lambda: got == [b"one", b"two"])
    assert sub.stats()["connects"] == 1  # the network thread lived on; no reconnect was needed
    assert sub.stats()["handler_errors"] == 1


def test_timers_and_calls_run_on_the_network_thread(
    settings: OutpostSettings, buses: Callable[..., Bus]
) -> None:
    b = buses("timers")
    ticks: list[str] = []
    b.every(0.05, lambda: ticks.append(threading.current_thread().name))
    b.start()
    assert wait_until(lambda: len(ticks) >= 3)
    seen: list[str] = []
    assert b.call(lambda: seen.append(threading.current_thread().name))
    assert set(ticks) == set(seen) == {f"bus-timers-{settings.site}"}


def test_call_later_runs_once_when_due_and_a_cancelled_one_never(
    settings: OutpostSettings, buses: Callable[..., Bus]
) -> None:
    """With nothing else due the thread sleeps ``tick_s`` (30 s here): a one-shot call must wake it
    when due, and a call from another thread must not wait out the sleep."""
    b = buses("later", tick_s=30.0)
    b.start()
    ran: list[str] = []
    b.call_later(0.2, lambda: ran.append(threading.current_thread().name))
    dropped = b.call_later(0.1, lambda: ran.append("cancelled"))
    b.cancel_later(dropped)
    assert wait_until(lambda: bool(ran), 10.0)
    seen: list[int] = []
    assert b.call(lambda: seen.append(1), timeout_s=10.0)
    time.sleep(0.3)
    assert ran == [f"bus-later-{settings.site}"] and seen == [1]
    b.cancel_later(dropped)  # twice, or after it ran: nothing happens


def test_an_idle_bus_sleeps_until_something_is_due(
    settings: OutpostSettings, buses: Callable[..., Bus]
) -> None:
    """No polling: with a 1 s timer and a 0.5 s tick the thread turns a few times a second, where
    a fixed 50 ms tick turned it twenty."""
    b = buses("idle", tick_s=0.5)
    b.every(1.0, lambda: None)
    turns = 0
    wait_s = b._wait_s

    def counted() -> float:
        nonlocal turns
        turns += 1
        return wait_s()

    b._wait_s = counted  # type: ignore[method-assign]
    b.start()
    time.sleep(0.5)
    before = turns
    time.sleep(2.0)
    assert 0 < turns - before <= 12


def test_stop_ends_the_network_thread_out_of_a_long_wait(
    settings: OutpostSettings, buses: Callable[..., Bus]
) -> None:
    """A stop wakes the thread's select() rather than waiting out its sleep (each stop waited
    ~0.45 s of a 0.5 s tick, minutes over the suite)."""
    b = buses("stopping", tick_s=30.0)
    b.start()
    time.sleep(0.2)
    started = time.monotonic()
    b.stop(drain_s=0)
    assert time.monotonic() - started < 8.0  # the join gives up at 10 s; the sleep is 30 s


def test_start_fails_clearly_without_a_broker(settings: OutpostSettings, broker: Mosquitto) -> None:
    broker.stop()
    b = Bus(settings.mqtt, client_id=f"nobroker-{settings.site}")
    with pytest.raises(Exception, match="cannot connect"):
        b.start(wait_s=1.0)


def test_start_returns_once_the_broker_has_the_subscriptions(
    settings: OutpostSettings, buses: Callable[..., Bus]
) -> None:
    """What another client publishes right after ``start()`` returns reaches the handlers: start
    waits for the SUBACK, not only the CONNACK (without it a loaded machine lost a third here)."""
    topic = settings.topics.root + "/t/right-after"
    pub = buses("pub")
    pub.start()
    for attempt in range(5):
        got: list[bytes] = []
        sub = buses(f"sub{attempt}")

        def keep(m: Message, got: list[bytes] = got) -> None:
            got.append(bytes(m.payload))

        sub.subscribe(topic, keep, qos=1)
        sub.subscribe(topic + "/other", lambda m: None, qos=1)
        sub.start()
        assert sub._subscribed.is_set()
        for i in range(50):
            pub.publish(topic, b"%d" % i, qos=1)
        deadline = time.monotonic() + WAIT
        while len(got) < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == [b"%d" % i for i in range(50)]
        sub.stop(drain_s=0)
