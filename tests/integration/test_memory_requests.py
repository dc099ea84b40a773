"""Memory's request API under hostile and heavy requests, against a real Mosquitto: an answer goes
only to a response topic of memory's own, and a burst of heavy requests slows its requester while
the log keeps flowing (docs/memory.md, "The request API")."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from outpost.bus import Bus
from outpost.datadir import site_path
from outpost.services.memory.client import MemoryClient, MemoryRequestError
from outpost.services.memory.oplog import OpLog
from outpost.services.memory.service import MemoryService, run
from outpost.services.registry import OutpostSettings
from outpost.topics import Topics
from tests.conftest import Collector, ServiceThread, make_event, wait_status, wait_until

pytestmark = pytest.mark.integration


def logged(settings: OutpostSettings, trace: str) -> bool:
    path = site_path(settings.data_dir, settings.site, "memory", "oplog.db")
    if not path.is_file():
        return False
    log = OpLog(path, synchronous="NORMAL")
    try:
        return bool(log.replay(trace=trace, limit=1))
    finally:
        log.close()


def request(bus: Bus, topic: str, body: bytes, response_topic: str, corr: bytes = b"c1") -> None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = response_topic
    props.CorrelationData = corr
    bus.publish(topic, body, qos=1, properties=props)


def test_answers_go_only_to_memorys_own_response_topics(settings: OutpostSettings, publisher: Bus) -> None:
    t = settings.topics
    other = Topics(site="elsewhere")
    seen = Collector(settings.mqtt, "#", client_id="all-" + settings.site).start()
    r: ServiceThread[MemoryService] = ServiceThread(run, settings).start()
    wait_status(settings, "memory")
    hostile = {
        "events": t.events("x"),  # the log would record it as an event
        "dlq": t.dlq("x"),  # ... as a dead letter
        "plus": f"{t.root}/memory/resp/+",
        "hash": f"{t.root}/memory/resp/#",
        "extra-level": t.memory_response("a") + "/b",
        "other-site": other.memory_response("a"),
    }
    for i, reply_to in enumerate(hostile.values()):
        body = orjson.dumps({"scope": "s", "key": "k", "value": i})
        request(publisher, t.memory_request("context-put"), body, reply_to, corr=f"h{i}".encode())
    # an honest request after them is answered, on its own topic
    with MemoryClient(settings, "honest") as mem:
        assert mem.request("context-get", {"scope": "s", "key": "k"}, timeout_s=30) is None
        with pytest.raises(MemoryRequestError) as e:  # refused before it waits for the worker
            mem.request("context-put", {"scope": "s", "key": "k", "value": "x" * 300_000}, timeout_s=30)
        assert e.value.reason == "too_large"

    def dead_letters() -> list[dict[str, object]]:
        out = []
        for topic, payload in list(seen.messages):
            if topic == t.dlq("memory"):
                out.append(orjson.loads(payload))
        return out

    assert wait_until(lambda: len(dead_letters()) >= len(hostile))
    letters = dead_letters()
    assert [d["reason"] for d in letters] == ["bad_response_topic"] * len(hostile)
    assert all("not answered" in str(d["detail"]) for d in letters)
    svc = r.stop()
    # nothing was published anywhere a request named; nothing ran (the context holds no value)
    topics = {topic for topic, _ in seen.messages}
    assert not topics & {t.events("x"), t.dlq("x"), other.memory_response("a")}
    assert not any("/memory/resp/" in topic and not topic.endswith("/honest") for topic in topics)
    assert svc.context.get("s", "k") is None
    c = svc.metrics.counters
    assert c["rejected.bad_response_topic"] == len(hostile) == c["requests_refused.bad_response_topic"]
    assert svc.rt.acks.waiting == 0  # every one was acknowledged
    # and the log recorded them as memory's dead letters, not as events of device x
    log = OpLog(site_path(settings.data_dir, settings.site, "memory", "oplog.db"), synchronous="NORMAL")
    entries = log.replay(limit=1000)
    log.close()
    assert not [e for e in entries if e.topic in (t.events("x"), t.dlq("x"))]
    assert len([e for e in entries if e.topic == t.dlq("memory")]) == len(hostile)
    seen.stop()


TEXT = ("the chiller on aisle four reported a door left open for several minutes " * 45)[:3000]


def test_a_burst_of_heavy_requests_slows_its_requester_and_never_the_log(
    settings: OutpostSettings, publisher: Bus
) -> None:
    """One embed over the limit, then eight embeds of 8 x 3,000 characters (2,048 encoder tokens
    each, the limit: about 0.8 s apiece here) from one client, while events flow and another client asks
    something light: the log keeps logging, the light request is not queued behind the burst,
    the burst past its client's bound is shed, and the over-limit request is refused unrun."""
    t = settings.topics
    settings.memory.request_queue_per_client = 3
    dlq = Collector(settings.mqtt, t.dlq("memory"), client_id="dq-" + settings.site).start()
    r: ServiceThread[MemoryService] = ServiceThread(run, settings).start()
    wait_status(settings, "memory")
    outcomes: list[str] = []
    lock = threading.Lock()

    def heavy(mem: MemoryClient, n: int) -> None:
        try:
            vectors = mem.request("embed", {"texts": [TEXT] * n}, timeout_s=120)
            outcome = f"ok:{len(vectors)}"
        except MemoryRequestError as exc:
            outcome = exc.reason
        with lock:
            outcomes.append(outcome)

    with MemoryClient(settings, "heavy") as mem, MemoryClient(settings, "light") as light:
        heavy(mem, 64)  # 16,384 tokens: over the limit, refused before the encoder runs
        assert outcomes == ["over_limit"]
        with ThreadPoolExecutor(8) as pool:
            futures: list[Future[None]] = [pool.submit(heavy, mem, 8) for _ in range(8)]
            # the log, while they run: each event is logged before the burst is over
            for i in range(5):
                publisher.publish(t.events("d1"), orjson.dumps([make_event("d1", i, "t", 1.0)]), qos=1)
                assert wait_until(partial(logged, settings, f"d1-{i}"), 60)
                with lock:
                    assert len([o for o in outcomes if o.startswith("ok")]) < 4, (i, outcomes)
            # another client's light request is answered before the burst is over
            assert light.request("context-get", {"scope": "s", "key": "k"}, timeout_s=60) is None
            with lock:
                assert len([o for o in outcomes if o.startswith("ok")]) < 4, outcomes
            for f in futures:
                f.result()
    svc = r.stop()
    assert outcomes.count("over_limit") == 1
    ran = outcomes.count("ok:8")
    shed = outcomes.count("overloaded")
    assert ran + shed == 8 and ran >= 4 and shed >= 1, outcomes  # one ran at once, 3 waited
    c = svc.metrics.counters
    assert c["requests_refused.overloaded"] == shed and c["requests_refused.over_limit"] == 1
    assert dlq.wait_for(lambda d: len(d.json()) == shed + 1, 30)
    assert sorted(str(d["reason"]) for d in dlq.json()) == sorted(["over_limit"] + ["overloaded"] * shed)
    assert svc.rt.acks.waiting == 0
    dlq.stop()


def test_a_redelivered_request_with_effects_runs_once(settings: OutpostSettings, publisher: Bus) -> None:
    """The same request twice (the broker's redelivery after a missed keepalive looks like this:
    same response topic, same correlation data): one effect, both answered alike."""
    t = settings.topics
    answers = Collector(settings.mqtt, t.memory_response("agent"), client_id="ans-" + settings.site).start()
    r: ServiceThread[MemoryService] = ServiceThread(run, settings).start()
    wait_status(settings, "memory")
    body = orjson.dumps({"task": "job", "step": "a", "state": {"n": 1}})
    for _ in range(2):
        request(publisher, t.memory_request("checkpoint-save"), body, t.memory_response("agent"), b"same")
    request(publisher, t.memory_request("checkpoint-save"), body, t.memory_response("agent"), b"other")
    assert answers.wait_for(lambda c: len(c.messages) == 3, 30)
    svc = r.stop()
    results = sorted(orjson.loads(p)["result"] for _, p in answers.messages)
    assert results == [1, 1, 2]  # the copy got version 1 again; only a new request made version 2
    assert svc.metrics.counters["requests_redelivered"] == 1
    # a copy that comes after a restart (a kill -9 before it was acknowledged) runs no more
    answers.messages.clear()
    r2: ServiceThread[MemoryService] = ServiceThread(run, settings).start()
    wait_status(settings, "memory")
    request(publisher, t.memory_request("checkpoint-save"), body, t.memory_response("agent"), b"same")
    request(publisher, t.memory_request("checkpoint-load"), b'{"task":"job"}', t.memory_response("agent"))
    assert answers.wait_for(lambda c: len(c.messages) == 2, 30)
    svc2 = r2.stop()
    save, load = sorted((orjson.loads(p)["result"] for _, p in answers.messages), key=str)
    assert save == 1 and load["version"] == 2, (save, load)
    assert svc2.metrics.counters["requests_redelivered"] == 1
    answers.stop()
