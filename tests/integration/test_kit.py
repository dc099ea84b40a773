"""The service kit against a real Mosquitto: acknowledgement policies (a message not yet safe is
redelivered after a restart, one that is safe is not), blocking work on the worker with
backpressure and nothing lost, handler outcomes dead-lettered with their reasons, and the bus's
publish listeners and read gate underneath."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import orjson
import pytest

from outpost.bus import Bus
from outpost.contracts import READING, ReadingDict
from outpost.service import Ack, Inbound, Rejected, ServiceRuntime
from outpost.services.registry import OutpostSettings
from tests.conftest import Collector, make_reading, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def runtimes(settings: OutpostSettings) -> Iterator[Callable[..., ServiceRuntime]]:
    made: list[ServiceRuntime] = []

    def make(name: str = "kit", **kw: Any) -> ServiceRuntime:
        rt = ServiceRuntime(name, settings, **kw)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        if rt.bus.connected:
            rt.stop(drain_s=1)


def _topic(settings: OutpostSettings, name: str) -> str:
    return f"{settings.topics.root}/test/{name}"


def test_after_commit_messages_are_redelivered_until_committed(
    settings: OutpostSettings, runtimes: Callable[..., ServiceRuntime], publisher: Bus
) -> None:
    topic = _topic(settings, "commit")
    seen: list[bytes] = []
    rt = runtimes(durable=True)
    rt.subscribe(topic, lambda m: seen.append(m.raw), ack=Ack.AFTER_COMMIT)
    rt.start()
    for i in range(5):
        publisher.publish(topic, b"%d" % i, qos=1)
    assert wait_until(lambda: len(seen) == 5)
    rt.bus.stop(drain_s=0)  # gone without a commit: nothing was acknowledged

    again: list[bytes] = []
    rt2 = runtimes(durable=True)
    rt2.subscribe(topic, lambda m: again.append(m.raw), ack=Ack.AFTER_COMMIT)
    rt2.start()
    assert wait_until(lambda: len(again) == 5), again
    rt2.bus.call(rt2.committed)
    assert wait_until(lambda: rt2.acks.acknowledged == 5)
    # a drained stop: the five acknowledgements are counted when handed to paho, and a stop
    # without a drain may close the socket before paho has written them (then they come back)
    rt2.bus.stop()

    third: list[bytes] = []
    rt3 = runtimes(durable=True)
    rt3.subscribe(topic, lambda m: third.append(m.raw), ack=Ack.AFTER_COMMIT)
    rt3.start()
    publisher.publish(topic, b"new", qos=1)
    assert wait_until(lambda: third == [b"new"]), third  # the committed five never came back


def test_outputs_hold_their_message_and_bad_input_reaches_the_dlq(
    settings: OutpostSettings,
    runtimes: Callable[..., ServiceRuntime],
    publisher: Bus,
    collect: Callable[..., Collector],
) -> None:
    topic = _topic(settings, "outputs")
    out_topic = _topic(settings, "out")
    out = collect(out_topic)
    dlq = collect(settings.topics.dlq("kit"))
    rt = runtimes(reasons=("too_cold",))

    def handle(m: Inbound[ReadingDict]) -> None:
        for index, r in m.items:
            if r["value"] < -50:
                raise Rejected("too_cold", f"reading {index} is {r['value']}")
            if r["value"] > 1000:
                raise RuntimeError("an injected bug")
            rt.publish(out_topic, orjson.dumps(r), for_=m.turn)

    rt.subscribe(topic, handle, contract=READING, ack=Ack.AFTER_OUTPUTS)
    rt.start()
    good = make_reading("d1", 1)
    publisher.publish(topic, orjson.dumps(good), qos=1)
    publisher.publish(topic, orjson.dumps([make_reading("d1", 2), {"device": "d1"}]), qos=1)
    publisher.publish(topic, orjson.dumps(make_reading("d1", 3, value=-60.0)), qos=1)
    publisher.publish(topic, orjson.dumps(make_reading("d1", 4, value=2000.0)), qos=1)
    publisher.publish(topic, b"\x00not json", qos=1)
    assert out.wait_for(lambda c: len(c.json()) == 2)
    assert dlq.wait_for(lambda c: len(c.json()) == 4)
    assert wait_until(lambda: rt.acks.acknowledged == 5)
    reasons = sorted((d["reason"], d["index"]) for d in dlq.json())
    assert reasons == [("internal", None), ("missing_field", 1), ("not_json", None), ("too_cold", None)]
    c = rt.metrics.counters
    assert c["messages"] == 5 and c["rejected"] == 4 and c["rejected.internal"] == 1


def test_blocking_work_is_bounded_and_nothing_is_lost(
    settings: OutpostSettings, runtimes: Callable[..., ServiceRuntime], publisher: Bus
) -> None:
    topic = _topic(settings, "work")
    rt = runtimes(worker_threads=2, worker_bound=4)
    done: list[int] = []
    most_queued = [0]
    on_worker: set[str] = set()

    def slow(n: int) -> int:
        on_worker.add(threading.current_thread().name)
        time.sleep(0.005)
        return n

    def finished(result: int | BaseException) -> None:
        done.append(cast(int, result))  # slow never raises

    def handle(m: Inbound[bytes]) -> None:
        n = int(m.raw)
        rt.submit(lambda: slow(n), finished, for_=m.turn)
        most_queued[0] = max(most_queued[0], rt.worker.queued)

    rt.subscribe(topic, handle, ack=Ack.AFTER_OUTPUTS)
    rt.start()
    for i in range(1000):
        publisher.publish(topic, b"%d" % i, qos=1)
    assert wait_until(lambda: len(done) == 1000)
    assert sorted(done) == list(range(1000))  # every one once
    assert wait_until(lambda: rt.acks.acknowledged == 1000)
    # the bus stopped reading while the queue was full (the broker kept the rest): it never grew
    # past its bound, though messages came ~5x faster than the two threads worked
    assert most_queued[0] <= 4, most_queued[0]
    assert all(name.startswith("kit-worker-") for name in on_worker)


def test_publish_listeners_all_hear_and_the_read_gate_holds_messages(
    settings: OutpostSettings, publisher: Bus
) -> None:
    topic = _topic(settings, "gate")
    heard: list[tuple[str, int]] = []
    pub = Bus(settings.mqtt, client_id=f"listened-{settings.site}")
    pub.add_publish_listener(lambda mid: heard.append(("a", mid)))
    pub.add_publish_listener(lambda mid: heard.append(("b", mid)))
    open_gate = threading.Event()
    got: list[bytes] = []
    sub = Bus(settings.mqtt, client_id=f"gated-{settings.site}")
    sub.subscribe(topic, lambda m: got.append(bytes(m.payload)), qos=1)
    try:
        pub.start()
        sub.start()
        sub.set_read_gate(open_gate.is_set)
        time.sleep(0.2)  # a turn of the network thread that was already reading
        mid = pub.publish(topic, b"x", qos=1)
        assert wait_until(lambda: ("a", mid) in heard and ("b", mid) in heard)
        time.sleep(0.5)
        assert got == []  # held back while the gate is closed
        assert sub.connected
        open_gate.set()
        assert wait_until(lambda: got == [b"x"])
    finally:
        pub.stop(drain_s=0)
        sub.stop(drain_s=0)


def test_qos0_input_is_shed_while_the_broker_does_not_take_our_output(
    settings: OutpostSettings,
    runtimes: Callable[..., ServiceRuntime],
    publisher: Bus,
    collect: Callable[..., Collector],
) -> None:
    """With its QoS 1 publishes waiting for the broker past ``max_pending`` (1 here), the kit sheds
    QoS 0 input as ``overloaded``: counted, dead-lettered in aggregate (``count``), never lost
    without a trace: handled + the dead letters' counts = sent."""
    topic = _topic(settings, "overload")
    out = _topic(settings, "overload-out")
    rt = runtimes(max_pending=1)
    dlq = collect(rt.dlq_topic)
    handled: list[bytes] = []

    def handler(m: Inbound[Any]) -> None:
        if not handled:
            time.sleep(0.05)  # the rest of the burst waits on the socket, read in one turn
        handled.append(m.raw)
        rt.publish(out, m.raw, qos=1)  # written, and so acknowledged, only after the turn

    rt.subscribe(topic, handler, qos=0)
    rt.start()
    n = 200
    for i in range(n):
        publisher.publish(topic, b"%d" % i, qos=0)

    def shed() -> int:
        return sum(d.get("count", 1) for d in dlq.json() if d["reason"] == "overloaded")

    assert wait_until(lambda: len(handled) + shed() == n), (len(handled), shed())
    assert shed() > 0
    assert rt.metrics.counters["rejected.overloaded"] == shed() == rt.metrics.counters["shed"]
    assert len(dlq.json()) < shed()  # aggregated


def test_a_shed_topic_is_shed_below_paho_and_every_message_is_accounted(
    settings: OutpostSettings,
    runtimes: Callable[..., ServiceRuntime],
    publisher: Bus,
    collect: Callable[..., Collector],
) -> None:
    """Once a QoS 0 message on a topic has been shed by the screen, the next QoS 0 messages on it
    are screened before paho reads them (``shed_unread``), into the same piles: the dead letters'
    counts still say how many. QoS 1 messages on it, and other topics, are read as before, and
    once the screen lets the topic through again, its messages reach the handler."""
    flood = _topic(settings, "flood")
    other = _topic(settings, "other")
    rt = runtimes()
    dlq = collect(rt.dlq_topic)
    handled: list[tuple[str, bytes]] = []
    shedding = [True]

    def screen(_key: str, msg: Any) -> str | None:
        return "overloaded" if shedding[0] and msg.topic == flood else None

    rt.subscribe(
        f"{settings.topics.root}/test/+", lambda m: handled.append((m.topic, m.raw)), qos=1, screen=screen
    )
    rt.start()

    def shed() -> int:
        return sum(d.get("count", 1) for d in dlq.json() if d["reason"] == "overloaded")

    publisher.publish(flood, b"first", qos=0)  # shed by paho's path: the topic is marked
    assert wait_until(lambda: rt.metrics.counters["shed"] == 1)
    n = 300
    for i in range(n):
        publisher.publish(flood, b"f%d" % i, qos=0)
        if i % 100 == 0:
            publisher.publish(other, b"o%d" % i, qos=0)
            publisher.publish(flood, b"q%d" % i, qos=1)
    assert wait_until(lambda: shed() == n + 1 + 3), shed()
    assert rt.metrics.counters["shed_unread"] == n  # every QoS 0 one after the first
    assert rt.metrics.counters["shed"] == n + 1 + 3  # and the QoS 1 ones, read by paho
    assert [p for _t, p in handled] == [b"o0", b"o100", b"o200"]
    shedding[0] = False
    publisher.publish(flood, b"back", qos=0)
    assert wait_until(lambda: (flood, b"back") in handled)
    assert rt.metrics.counters["shed_unread"] == n
    assert rt.metrics.counters["rejected.overloaded"] == shed()


def test_with_two_subscriptions_nothing_is_shed_below_paho(
    settings: OutpostSettings,
    runtimes: Callable[..., ServiceRuntime],
    publisher: Bus,
) -> None:
    """A message may match two subscriptions: one that sheds it must not take it from the other."""
    flood = _topic(settings, "flood2")
    rt = runtimes()
    other: list[bytes] = []
    rt.subscribe(f"{settings.topics.root}/test/+", lambda _m: None, qos=1, screen=lambda _k, _m: "overloaded")
    rt.subscribe(flood, lambda m: other.append(m.raw), qos=1)
    rt.start()
    n = 50
    for i in range(n):
        publisher.publish(flood, b"%d" % i, qos=0)
    # (Mosquitto sends an MQTT 5 client one copy per matching subscription, and paho hands each
    # copy to both handlers: at least n each)
    assert wait_until(lambda: len(set(other)) == n and rt.metrics.counters["shed"] >= n), len(other)
    assert rt.metrics.counters["shed_unread"] == 0
