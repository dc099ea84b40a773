"""The memory service's operational log against a real Mosquitto: events, scores and dead letters
land in the log with their trace, one query returns everything a reading caused, kill -9 loses
nothing that was published, bad input is dead-lettered, and ``outpost log`` reads it all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from outpost.bus import Bus
from outpost.contracts import dead_letter
from outpost.datadir import site_path
from outpost.services.memory.oplog import OpLog
from outpost.services.memory.service import run
from outpost.services.registry import OutpostSettings
from tests.conftest import Collector, ServiceThread, make_event, outpost, wait_status

pytestmark = pytest.mark.integration


def oplog(settings: OutpostSettings) -> OpLog:
    return OpLog(site_path(settings.data_dir, settings.site, "memory", "oplog.db"), synchronous="NORMAL")


def wait_count(settings: OutpostSettings, n: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = site_path(settings.data_dir, settings.site, "memory", "oplog.db")
        if path.is_file():
            log = oplog(settings)
            have = log.count()
            log.close()
            if have >= n:
                return True
        time.sleep(0.1)
    return False


def score(device: str, eid: str) -> dict[str, object]:
    return {
        "v": 1,
        "id": "s-" + eid,
        "ts": time.time_ns(),
        "trace": eid,
        "event": eid,
        "device": device,
        "model": "shelf-stock",
        "version": "1.0.0",
        "score": 0.9,
        "label": "empty",
    }


def test_the_log_holds_what_happened_and_trace_returns_all_a_reading_caused(
    settings: OutpostSettings, publisher: Bus, tmp_path: Path
) -> None:
    t = settings.topics
    dlq = Collector(settings.mqtt, t.dlq("memory"), client_id="dm-" + settings.site).start()
    r = ServiceThread(run, settings).start()
    wait_status(settings, "memory")
    events = [make_event("shelf-001", i, "shelf_weight", 5.0 + i) for i in range(50)]
    publisher.publish(t.events("shelf-001"), orjson.dumps(events), qos=1)
    publisher.publish(
        t.inference("shelf-stock", "shelf-001"), orjson.dumps([score("shelf-001", "shelf-001-7")]), qos=1
    )
    publisher.publish(
        t.dlq("ingest"),
        dead_letter(
            stage="ingest", reason="duplicate", detail="seen", topic="x", payload=b"{}", trace="shelf-001-7"
        ),
        qos=1,
    )
    # the same score again (a redelivery, a resend across a reconnect): its id is logged already
    publisher.publish(
        t.inference("shelf-stock", "shelf-001"), orjson.dumps([score("shelf-001", "shelf-001-7")]), qos=1
    )
    publisher.publish(t.events("shelf-002"), b"{not json", qos=1)
    # 50 events, a score, a dead letter from ingest and the memory service's own dead letter (it
    # comes back after the repeated score, so that one has been handled by then)
    assert wait_count(settings, 53)
    svc = r.stop()
    assert svc.metrics.counters["log_duplicates"] == 1
    dlq.stop()
    log = oplog(settings)
    kinds = {k: len(log.replay(kind=k)) for k in ("event", "score", "dlq")}
    assert kinds == {"event": 50, "score": 1, "dlq": 2}, kinds
    chain = log.trace("shelf-001-7")
    assert [e.kind for e in chain] == ["event", "score", "dlq"]
    assert orjson.loads(chain[0].body)["value"] == 12.0
    offsets = [e.offset for e in log.read(0)]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert svc.metrics.counters["rejected.not_json"] == 1
    assert [d["reason"] for d in dlq.json()] == ["not_json"]
    log.close()


def memory_env(settings: OutpostSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("OUTPOST_")}
    env.update(
        OUTPOST_SITE=settings.site,
        OUTPOST_DATA_DIR=str(settings.data_dir),
        OUTPOST_MQTT__PORT=str(settings.mqtt.port),
        OUTPOST_TELEMETRY__METRICS_INTERVAL_S="0.5",
    )
    return env


def test_kill_9_mid_stream_loses_nothing_that_was_published(
    settings: OutpostSettings, publisher: Bus
) -> None:
    t = settings.topics
    env = memory_env(settings)

    def start() -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [sys.executable, "-m", "outpost.services.memory"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_status(settings, "memory", pid=p.pid)
        return p

    proc = start()
    n = 3000
    sent: list[str] = []

    def stream() -> None:
        for i in range(n):
            ev = make_event(f"dev-{i % 5}", i, "temperature", 20.0)
            publisher.publish(t.events(ev["device"]), orjson.dumps([ev]), qos=1)
            sent.append(ev["id"])
            if i % 100 == 0:
                time.sleep(0.01)

    sender = threading.Thread(target=stream)
    sender.start()
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    time.sleep(0.3)
    proc = start()
    sender.join(60)
    try:
        assert wait_count(settings, n, 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    log = oplog(settings)
    ids = [
        orjson.loads(e.body)[0]["id"]
        if isinstance(orjson.loads(e.body), list)
        else orjson.loads(e.body)["id"]
        for e in log.replay(kind="event", limit=10**6)
    ]
    log.close()
    # nothing lost, and nothing twice: a message committed but not yet acknowledged when the
    # process died comes again, and its id is already in the log
    assert sorted(ids) == sorted(sent)


def cli(settings: OutpostSettings, *args: str) -> subprocess.CompletedProcess[str]:
    return outpost("log", *args, env=memory_env(settings), timeout=60)


def test_outpost_log_tail_replay_trace_and_bad_arguments(settings: OutpostSettings, publisher: Bus) -> None:
    t = settings.topics
    assert cli(settings, "tail").returncode == 2  # no log yet: a clear error
    r = ServiceThread(run, settings).start()
    wait_status(settings, "memory")
    publisher.publish(
        t.events("d1"), orjson.dumps([make_event("d1", i, "temperature", 1.0) for i in range(10)]), qos=1
    )
    publisher.publish(t.inference("m", "d1"), orjson.dumps([score("d1", "d1-3")]), qos=1)
    publisher.publish(t.events("d2"), b"{not json", qos=1)  # memory's own dead letter, logged
    assert wait_count(settings, 12)
    r.stop()
    # at 80 columns a dead letter's reason stays in view and no line is cut
    p = outpost("log", "tail", "--kind", "dlq", env={**memory_env(settings), "COLUMNS": "80"}, timeout=60)
    assert p.returncode == 0 and "not_json" in p.stdout, p.stdout + p.stderr
    assert max(len(line) for line in p.stdout.splitlines()) <= 80, p.stdout
    p = cli(settings, "trace", "d1-3", "--json")
    assert p.returncode == 0, p.stderr
    lines = [orjson.loads(x) for x in p.stdout.strip().splitlines()]
    assert [d["kind"] for d in lines] == ["event", "score"] and lines[1]["body"]["label"] == "empty"
    p = cli(settings, "replay", "--from", "2", "--to", "4", "--json")
    assert [orjson.loads(x)["offset"] for x in p.stdout.strip().splitlines()] == [2, 3, 4]
    p = cli(settings, "tail", "-n", "3")
    assert p.returncode == 0 and "3 entries" in p.stdout
    p = cli(settings, "replay", "--kind", "score", "--since", "2000-01-01T00:00:00", "--json")
    assert len(p.stdout.strip().splitlines()) == 1
    p = cli(settings, "tail", "--kind", "bogus")
    assert p.returncode == 2 and "'bogus' is not one of" in p.stderr
    for args, message in (
        (("replay", "--from", "5", "--to", "2"), "before --from"),
        (("replay", "--since", "yesterday"), "ISO 8601"),
        (("trace", "no-such-trace"), "nothing in the log"),
    ):
        p = cli(settings, *args)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)


def test_the_request_api_over_mqtt5_answers_refuses_and_times_out(
    settings: OutpostSettings, publisher: Bus
) -> None:
    from outpost.services.memory.client import MemoryClient, MemoryRequestError, MemoryTimeout

    t = settings.topics
    with MemoryClient(settings, "agent-1") as mem:
        # nothing serves yet: a clear timeout, not a hang
        with pytest.raises(MemoryTimeout):
            mem.request("context-get", {"scope": "s", "key": "k"}, timeout_s=0.5)
        r = ServiceThread(run, settings).start()
        wait_status(settings, "memory")
        assert mem.request("context-put", {"scope": "task-7", "key": "step", "value": 3}) is True
        assert mem.request("context-get", {"scope": "task-7", "key": "step"}) == 3
        assert (
            mem.request(
                "checkpoint-save", {"task": "task-7", "step": "fetch", "state": {"n": 1}, "expect": 0}
            )
            == 1
        )
        with pytest.raises(MemoryRequestError) as e:
            mem.request("checkpoint-save", {"task": "task-7", "step": "fetch", "state": {}, "expect": 0})
        assert e.value.reason == "conflict"
        with pytest.raises(MemoryRequestError) as e:
            mem.request("context-get", {"scope": "task-7", "key": "step", "huh": 1})
        assert e.value.reason == "bad_request"
        with pytest.raises(MemoryRequestError) as e:
            mem.request("nope", {})
        assert e.value.reason == "unknown_op"
        # long-term memory by text: the service embeds with the bundled encoder
        for note in ("fridge 2 door seal replaced", "till 3 receipt printer jammed"):
            mem.request("ltm-add", {"namespace": "notes", "text": note, "subject": "shift-a"})
        hits = mem.request("ltm-search", {"namespace": "notes", "text": "refrigerator door", "k": 2})
        assert hits[0]["payload"] == "fridge 2 door seal replaced"
        assert mem.request("ltm-forget-subject", {"subject": "shift-a"}) == 2
        assert mem.request("ltm-search", {"namespace": "notes", "text": "refrigerator door"}) == []
        publisher.publish(t.events("d9"), orjson.dumps([make_event("d9", 1, "temperature", 1.0)]), qos=1)
        assert wait_count(settings, 1)
        chain = mem.request("log-trace", {"trace": "d9-1"})
        assert [e["kind"] for e in chain] == ["event"]
        # a refused request with no response topic goes to the DLQ
        dlq = Collector(settings.mqtt, t.dlq("memory"), client_id="dq-" + settings.site).start()
        publisher.publish(t.memory_request("context-get"), b"{not json", qos=1)
        assert dlq.wait_for(lambda c: any(d["reason"] == "not_json" for d in c.json()), 30)
        dlq.stop()
        svc = r.stop()
        c = svc.metrics.counters
        assert c["requests_refused.conflict"] == 1 and c["requests_refused.unknown_op"] == 1
        # after a restart the checkpoint is there, the short-term context is not (by design)
        r2 = ServiceThread(run, settings).start()
        wait_status(settings, "memory")
        loaded = mem.request("checkpoint-load", {"task": "task-7"})
        assert loaded["version"] == 1 and loaded["state"] == {"n": 1}
        assert mem.request("context-get", {"scope": "task-7", "key": "step"}) is None
        r2.stop()
