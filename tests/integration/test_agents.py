"""The agent service against a real Mosquitto: decisions, action requests in the outbox, people in
the loop, supervision (docs/agents.md). The guarantees of issue 8: no action repeats after kill -9
at any step; budgets and the kill switch stop a runaway agent within one step; escalations survive
a restart and their replies apply once; a timeout applies the safe default."""

from __future__ import annotations

import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from paho.mqtt.client import topic_matches_sub

from outpost.broker import Mosquitto
from outpost.bus import Bus
from outpost.contracts import derived_id, header
from outpost.datadir import site_path
from outpost.services.agent.service import AgentService, run
from outpost.services.agent.spec import AgentSpec
from outpost.services.agent.supervisor import command
from outpost.services.registry import OutpostSettings
from tests.conftest import Collector, ServiceProcess, ServiceThread, make_event, wait_status, wait_until

pytestmark = pytest.mark.integration

_seq = iter(range(1, 10**9))


def make_score(
    device: str,
    *,
    model: str = "shelf-stock",
    label: str = "low",
    confidence: float = 0.95,
    alert: bool = True,
    n: int | None = None,
) -> dict[str, Any]:
    n = next(_seq) if n is None else n
    ts = time.time_ns()
    return {
        "v": 1,
        "id": f"s-{device}-{n}",
        "ts": ts,
        "trace": f"r-{device}-{n}",
        "event": f"e-{device}-{n}",
        "device": device,
        "model": model,
        "version": "1.0.0",
        "backend": "onnxruntime-cpu",
        "score": 0.9 if alert else 0.1,
        "label": label,
        "confidence": confidence,
        "alert": alert,
        "queue_ms": 0.1,
        "compute_ms": 0.1,
        "batch": 1,
        "ingest_ns": ts,
    }


def reorder_agent(**over: Any) -> AgentSpec:
    doc: dict[str, Any] = {
        "sense": ["inference/shelf-stock/+"],
        "rules": [
            {
                "name": "low",
                "when": {"label": {"in": ["low", "empty"]}},
                "do": ["inventory.reorder"],
                "args": {"shelf": "{device}", "quantity": 5},
            }
        ],
        "may": ["inventory.reorder"],
        "escalation": {"below": 0.8, "timeout_s": 600},
        "drift": {"enabled": False},
    }
    doc.update(over)
    return AgentSpec.model_validate(doc)


def agent_settings(settings: OutpostSettings, **agents: AgentSpec) -> OutpostSettings:
    settings.agents.packs = []
    settings.agents.declared = dict(agents)
    return settings


def test_a_score_becomes_a_decision_and_an_action_request(settings: OutpostSettings, publisher: Bus) -> None:
    agent_settings(settings, restock=reorder_agent())
    t = settings.topics
    decisions = Collector(settings.mqtt, t.decisions("restock"), client_id="d-" + settings.site).start()
    actions = Collector(settings.mqtt, t.actions("inventory"), client_id="a-" + settings.site).start()
    svc: ServiceThread[AgentService] = ServiceThread(run, settings).start()
    wait_status(settings, "agents")
    score = make_score("shelf-001")
    publisher.publish(t.inference("shelf-stock", "shelf-001"), orjson.dumps([score]), qos=1)
    assert actions.wait_for(lambda c: len(c.json()) >= 1, 10)
    req = actions.json()[0]
    assert req["capability"] == "inventory.reorder"
    assert req["args"] == {"shelf": "shelf-001", "quantity": 5}
    assert req["trace"] == score["trace"]
    did = derived_id("restock", score["id"], "0")
    assert req["key"] == derived_id(did, "action")
    assert decisions.wait_for(lambda c: len(c.events()) >= 1, 10)
    d = decisions.events()[0]
    assert (d["id"], d["kind"], d["trace"]) == (did, "act", score["trace"])
    svc.stop()


# --- helpers for the guarantees below --------------------------------------------------------------


def every_agent(**over: Any) -> AgentSpec:
    """A runaway: acts on every score it senses."""
    doc: dict[str, Any] = {
        "sense": ["inference/shelf-stock/+"],
        "rules": [
            {"name": "always", "when": {"kind": "score"}, "do": ["notify.staff"], "args": {"d": "{device}"}}
        ],
        "may": ["notify.staff"],
        "escalation": {"below": 0.5, "timeout_s": 600},
        "drift": {"enabled": False},
    }
    doc.update(over)
    return AgentSpec.model_validate(doc)


def seen(c: Collector, pattern: str) -> list[Any]:
    """The JSON messages ``c`` got on topics matching ``pattern`` (retained clears skipped)."""
    with c.lock:
        got = list(c.messages)
    out: list[Any] = []
    for topic, p in got:
        if p and topic_matches_sub(pattern, topic):
            doc = orjson.loads(p)  # decisions come as a list per commit
            out.extend(doc if isinstance(doc, list) else [doc])
    return out


def agent_db(settings: OutpostSettings) -> Path:
    return site_path(settings.data_dir, settings.site, "agents", "agent.db")


def rows(settings: OutpostSettings, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A query of agent.db, read-only, while the service may be writing it."""
    path = agent_db(settings)
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return [tuple(r) for r in db.execute(sql, params).fetchall()]
    except sqlite3.OperationalError:  # the schema is not there yet
        return []
    finally:
        db.close()


class Site:
    """The service in-process (restartable), a publisher, and one collector of everything under the
    site's root."""

    def __init__(self, settings: OutpostSettings, publisher: Bus) -> None:
        self.settings = settings
        self.t = settings.topics
        self.pub = publisher
        self.all = Collector(settings.mqtt, f"{self.t.root}/#", client_id="all-" + settings.site).start()
        self.svc: ServiceThread[AgentService] | None = None

    def start(self) -> Site:
        self.svc = ServiceThread(run, self.settings).start()
        wait_status(self.settings, "agents")
        return self

    def stop(self) -> None:
        if self.svc is not None and self.svc.thread.is_alive():
            self.svc.stop()
        self.svc = None

    def forget(self) -> None:
        """Drop what was collected so far (retained messages from before a restart, say)."""
        with self.all.lock:
            self.all.messages.clear()

    def restart(self) -> None:
        self.stop()
        self.start()

    def score(self, device: str = "shelf-001", **kw: Any) -> dict[str, Any]:
        s = make_score(device, **kw)
        self.pub.publish(self.t.inference(s["model"], device), orjson.dumps([s]), qos=1)
        return s

    def reply(self, agent: str, decision: str, choice: str, *, rid: str | None = None, **kw: Any) -> str:
        doc = {**header("", id=rid), "choice": choice, "by": "pat", **kw}
        self.pub.publish(self.t.escalation_reply(agent, decision), orjson.dumps(doc), qos=1)
        return str(doc["id"])

    def control(self, doc: dict[str, Any]) -> None:
        self.pub.publish(self.t.control("agents", "desired"), orjson.dumps(doc), qos=1, retain=True)

    def decisions(self, agent: str) -> list[dict[str, Any]]:
        return seen(self.all, self.t.decisions(agent))

    def escalations(self, agent: str) -> list[dict[str, Any]]:
        return seen(self.all, self.t.escalations(agent))

    def actions(self, connector: str) -> list[dict[str, Any]]:
        return seen(self.all, self.t.actions(connector))

    def keys(self, connector: str) -> set[str]:
        """The idempotency keys of the action requests seen (a request may be re-sent)."""
        return {a["key"] for a in self.actions(connector)}

    def dead(self) -> list[dict[str, Any]]:
        return seen(self.all, self.t.dlq("agents"))

    def metrics(self) -> list[dict[str, Any]]:
        """The service's metrics batches so far."""
        return seen(self.all, self.t.metrics("agents"))

    def wait_metrics(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 15) -> dict[str, Any]:
        """The first metrics batch for which ``pred`` holds."""
        assert wait_until(lambda: any(pred(m) for m in self.metrics()), timeout), (
            self.metrics()[-1:] or "no metrics"
        )
        return next(m for m in self.metrics() if pred(m))

    def reported(self, agent: str) -> dict[str, Any]:
        docs = seen(self.all, self.t.control("agents", "reported"))
        return dict(docs[-1]["agents"][agent]) if docs else {}

    def wait_reported(
        self, agent: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 15
    ) -> dict[str, Any]:
        assert wait_until(lambda: bool(self.reported(agent)) and pred(self.reported(agent)), timeout), (
            self.reported(agent)
        )
        return self.reported(agent)


@pytest.fixture
def site_of(settings: OutpostSettings, publisher: Bus) -> Iterator[Callable[..., Site]]:
    made: list[Site] = []

    def make(**agents: AgentSpec) -> Site:
        agent_settings(settings, **agents)
        settings.agents.check_s = 0.2
        settings.agents.report_s = 0.2
        s = Site(settings, publisher).start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()
        s.all.stop()


class FakeConnector:
    """What the connector gateway would do: each request's key carried out once, its result
    published (``outcome``); re-sent requests (same key) are answered ``duplicate``."""

    def __init__(
        self, settings: OutpostSettings, connector: str, outcome: str = "done", *, cost: float = 0.0
    ) -> None:
        self.t = settings.topics
        self.connector = connector
        self.outcome = outcome
        self.cost = cost
        self.keys: dict[str, int] = defaultdict(int)
        self.bus = Bus(settings.mqtt, client_id=f"conn-{connector}-{settings.site}")
        self.bus.subscribe(self.t.actions(connector), self._on, qos=1)
        self.bus.start(wait_s=30)

    def _on(self, msg: Any) -> None:
        req = orjson.loads(msg.payload)
        key = req["key"]
        self.keys[key] += 1
        outcome = self.outcome if self.keys[key] == 1 else "duplicate"
        result = {
            **header(req["trace"], id=derived_id(key, "result", str(self.keys[key]))),
            "key": key,
            "request": req["id"],
            "outcome": outcome,
            "attempts": 1,
            **({"cost": self.cost} if self.cost else {}),
        }
        self.bus.publish(self.t.action_results(self.connector), orjson.dumps(result), qos=1)

    def stop(self) -> None:
        self.bus.stop(drain_s=1)


# --- kill -9 at any step ---------------------------------------------------------------------------


def test_no_action_repeats_after_kill_9_at_any_step(
    broker: Mosquitto, settings: OutpostSettings, publisher: Bus, tmp_path: Path
) -> None:
    """The service as a real process, killed -9 before a commit, right after publishing and in the
    middle of a stream: every input acts once, under the one key its decision gives it."""
    t = settings.topics
    spec = reorder_agent(escalation={"below": 0.1, "timeout_s": 600}, limits={"actions_per_minute": 1000})
    site_file = tmp_path / "outpost.yaml"
    site_file.write_text(
        yaml.safe_dump(
            {
                "agents": {
                    "packs": [],
                    "declared": {"restock": spec.model_dump(mode="json", by_alias=True, exclude_unset=True)},
                }
            }
        )
    )
    env = {
        "OUTPOST_SITE": settings.site,
        "OUTPOST_DATA_DIR": str(settings.data_dir),
        "OUTPOST_MQTT__PORT": str(broker.port),
        "OUTPOST_CONFIG": str(site_file),
        "OUTPOST_AGENTS__RESEND_S": "3600",
        "OUTPOST_MEMORY__EMBEDDER_CACHE": os.environ["OUTPOST_MEMORY__EMBEDDER_CACHE"],
    }
    actions = Collector(settings.mqtt, t.actions("inventory"), client_id="a-" + settings.site).start()
    decisions = Collector(settings.mqtt, t.decisions("restock"), client_id="d-" + settings.site).start()
    proc = ServiceProcess("outpost.services.agent", "agents", env, tmp_path / "proc")
    scores = [make_score(f"shelf-{i:03d}") for i in range(300)]

    def publish(part: list[dict[str, Any]]) -> None:
        for s in part:
            publisher.publish(t.inference("shelf-stock", s["device"]), orjson.dumps([s]), qos=1)

    def start() -> None:
        p = proc.start()
        wait_status(settings, "agents", pid=p.pid, timeout=60)

    def acted_on(part: list[dict[str, Any]]) -> int:
        traces = {s["trace"] for s in part}
        return sum(1 for a in actions.json() if a["trace"] in traces)

    try:
        # 1. before the commit: decisions wait up to 1 s for theirs, and the kill comes first
        proc.env |= {"OUTPOST_AGENTS__COMMIT_MS": "1000", "OUTPOST_AGENTS__CHECK_S": "30"}
        start()
        publish(scores[:15])
        time.sleep(0.3)
        proc.kill()
        proc.env |= {"OUTPOST_AGENTS__COMMIT_MS": "2", "OUTPOST_AGENTS__CHECK_S": "0.5"}
        # 2. right after publishing: killed as the first of these action requests is seen
        start()
        publish(scores[15:30])
        assert actions.wait_for(lambda c: acted_on(scores[15:30]) >= 1, 30), proc.logs()
        proc.kill()
        # 3. in the middle of a stream, with more arriving while it is down
        start()
        publish(scores[30:230])
        assert actions.wait_for(lambda c: acted_on(scores[30:230]) >= 20, 30), proc.logs()
        proc.kill()
        publish(scores[230:260])
        start()
        publish(scores[260:])
        expected = {s["trace"]: derived_id(derived_id("restock", s["id"], "0"), "action") for s in scores}
        assert actions.wait_for(lambda c: {a["key"] for a in c.json()} >= set(expected.values()), 60), (
            len({a["key"] for a in actions.json()}),
            proc.logs(),
        )
        assert proc.terminate() == 0
    finally:
        proc.close()
        actions.stop()
        decisions.stop()

    # every action key seen is the one its input's decision gives: re-sent maybe, never re-decided
    for a in actions.json():
        assert a["key"] == expected[a["trace"]], a
        assert a["id"] == derived_id(derived_id("restock", a["trace"].replace("r-", "s-", 1), "0"), "request")
    keys_per_input: dict[str, set[str]] = defaultdict(set)
    for a in actions.json():
        keys_per_input[a["trace"]].add(a["key"])
    assert all(len(k) == 1 for k in keys_per_input.values())
    assert set(keys_per_input) == set(expected)
    # each published decision id is its input's
    for d in decisions.events():
        assert d["id"] == derived_id("restock", d["trace"].replace("r-", "s-", 1), "0")
    # agent.db: each input decided once, each decision one action request
    decided = rows(settings, "SELECT input, COUNT(*) FROM decisions GROUP BY input")
    assert sorted(decided) == sorted((s["id"], 1) for s in scores)
    assert {r[0] for r in rows(settings, "SELECT kind FROM decisions")} == {"act"}
    outbox = rows(settings, "SELECT key, COUNT(*) FROM actions GROUP BY key")
    assert sorted(outbox) == sorted((k, 1) for k in expected.values())


def test_no_answer_acts_twice_after_kill_9_between_replies_and_timeouts(
    broker: Mosquitto, settings: OutpostSettings, publisher: Bus, tmp_path: Path
) -> None:
    """Escalations answered by a person (replies redelivered) and by the timeout's default, with
    kill -9 while replies are applied and while timeouts act: each escalation acts once, under the
    key its answer gives it."""
    t = settings.topics
    spec = reorder_agent(
        escalation={"below": 0.8, "timeout_s": 4, "on_timeout": "approve"},
        limits={"actions_per_minute": 1000},
    )
    dumped = spec.model_dump(mode="json", by_alias=True, exclude_unset=True)
    site_file = tmp_path / "outpost.yaml"
    site_file.write_text(yaml.safe_dump({"agents": {"packs": [], "declared": {"restock": dumped}}}))
    env = {
        "OUTPOST_SITE": settings.site,
        "OUTPOST_DATA_DIR": str(settings.data_dir),
        "OUTPOST_MQTT__PORT": str(broker.port),
        "OUTPOST_CONFIG": str(site_file),
        "OUTPOST_AGENTS__RESEND_S": "3600",
        "OUTPOST_AGENTS__CHECK_S": "0.2",
    }
    actions = Collector(settings.mqtt, t.actions("inventory"), client_id="a-" + settings.site).start()
    escalations = Collector(settings.mqtt, t.escalations("restock"), client_id="e-" + settings.site).start()
    proc = ServiceProcess("outpost.services.agent", "agents", env, tmp_path / "proc")

    def start() -> None:
        p = proc.start()
        wait_status(settings, "agents", pid=p.pid, timeout=60)

    replies: list[tuple[str, bytes]] = []
    try:
        start()
        for i in range(20):
            s = make_score(f"shelf-{i:03d}", confidence=0.5)
            publisher.publish(t.inference("shelf-stock", s["device"]), orjson.dumps([s]), qos=1)
        assert escalations.wait_for(lambda c: len({e["decision"] for e in c.json()}) == 20, 30), proc.logs()
        decisions = sorted({e["decision"] for e in escalations.json()})
        for d in decisions[:10]:
            doc = {**header(""), "choice": "approve", "by": "pat"}
            replies.append((t.escalation_reply("restock", d), orjson.dumps(doc)))
        for topic, body in replies:
            publisher.publish(topic, body, qos=1)
        assert actions.wait_for(lambda c: len(c.json()) >= 1, 30), proc.logs()
        proc.kill()  # while the replies are applied
        start()
        for topic, body in replies:  # each reply sent again, the same id
            publisher.publish(topic, body, qos=1)
        assert actions.wait_for(lambda c: len({a["key"] for a in c.json()}) >= 11, 30), proc.logs()
        proc.kill()  # while the timeouts act
        start()
        expected = {derived_id(derived_id(d, "answer"), "action") for d in decisions}
        assert actions.wait_for(lambda c: {a["key"] for a in c.json()} >= expected, 30), proc.logs()
        assert proc.terminate() == 0
    finally:
        proc.close()
        actions.stop()
        escalations.stop()
    assert {a["key"] for a in actions.json()} == expected
    states = dict(rows(settings, "SELECT state, COUNT(*) FROM escalations GROUP BY state"))
    assert set(states) <= {"answered", "timed_out"} and sum(states.values()) == 20, states
    assert sorted(rows(settings, "SELECT kind, COUNT(*) FROM decisions GROUP BY kind")) == [
        ("act", 20),
        ("escalate", 20),
    ]
    assert rows(settings, "SELECT COUNT(DISTINCT decision), COUNT(*) FROM actions") == [(20, 20)]


# --- budgets and the kill switch -------------------------------------------------------------------


def test_a_runaway_agent_is_halted_within_one_step_and_a_person_resumes_it(
    site_of: Callable[..., Site],
) -> None:
    site = site_of(runaway=every_agent(limits={"actions_per_minute": 3}))
    for i in range(6):
        site.score(f"shelf-{i}")
    assert wait_until(lambda: any(d["kind"] == "halt" for d in site.decisions("runaway")), 15)
    assert wait_until(lambda: len(site.escalations("runaway")) == 1, 15)
    site.wait_reported("runaway", lambda r: r["state"] == "halted" and r["breaches"] == 1)
    # exactly the limit acted, then one halt; what came after the halt was not decided on
    ds = site.decisions("runaway")
    assert [d["kind"] for d in ds] == ["act", "act", "act", "halt"]
    assert "actions_per_minute" in ds[3]["reason"]
    assert len(site.keys("notify")) == 3
    esc = site.escalations("runaway")[0]
    assert esc["options"] == ["resume", "keep-halted"] and esc["decision"] == ds[3]["id"]
    # the person resumes it: the next step is looked at again (and the used budget still counts)
    site.reply("runaway", esc["decision"], "resume")
    site.wait_reported("runaway", lambda r: r["state"] == "running")
    site.score("shelf-9")
    assert wait_until(lambda: len(site.decisions("runaway")) == 5, 15)
    assert site.decisions("runaway")[4]["kind"] == "halt"
    assert len(site.keys("notify")) == 3


def test_the_kill_switch_stops_acting_on_the_next_input_and_holds_across_a_restart(
    site_of: Callable[..., Site],
) -> None:
    """``stopped`` for one agent and for all, retained: a witness agent that senses the same input
    shows each input was looked at."""
    site = site_of(target=every_agent(), witness=every_agent(may=["notify.staff", "log.note"]))

    def looked_at(n: int) -> bool:
        return wait_until(lambda: len(site.decisions("witness")) >= n, 15)

    site.score("shelf-1")
    assert looked_at(1) and wait_until(lambda: len(site.decisions("target")) == 1, 15)
    doc = command({}, "stop", "target") | {"ts": time.time_ns()}
    site.control(doc)
    site.wait_reported("target", lambda r: r["state"] == "stopped")
    site.score("shelf-2")
    assert looked_at(2)
    site.restart()
    site.wait_reported("target", lambda r: r["state"] == "stopped")
    site.score("shelf-3")
    assert looked_at(3)
    assert len(site.decisions("target")) == 1
    # everyone stopped
    doc = command(doc, "stop", None) | {"ts": time.time_ns()}
    site.control(doc)
    site.wait_reported("witness", lambda r: r["state"] == "stopped")
    site.restart()
    site.wait_reported("witness", lambda r: r["state"] == "stopped")
    site.score("shelf-4")
    # resume all: both act on the next input, the earlier ones are not replayed
    doc = command(doc, "resume", None) | {"ts": time.time_ns()}
    site.control(doc)
    site.wait_reported("target", lambda r: r["state"] == "running")
    site.score("shelf-5")
    assert looked_at(4) and wait_until(lambda: len(site.decisions("target")) == 2, 15)
    assert [d["args"]["d"] for d in site.decisions("target")] == ["shelf-1", "shelf-5"]
    assert [d["args"]["d"] for d in site.decisions("witness")] == ["shelf-1", "shelf-2", "shelf-3", "shelf-5"]


def test_a_halt_holds_across_a_restart_and_only_a_newer_resume_clears_it(
    site_of: Callable[..., Site],
) -> None:
    site = site_of(runaway=every_agent(limits={"actions_per_minute": 1}), witness=every_agent())
    site.score("shelf-1")
    site.score("shelf-2")
    site.wait_reported("runaway", lambda r: r["state"] == "halted")
    site.restart()
    site.forget()
    site.wait_reported("runaway", lambda r: r["state"] == "halted")
    site.score("shelf-3")
    assert wait_until(lambda: len(site.decisions("witness")) == 1, 15)
    # a resume older than the halt does not clear it (the bad document after it shows it was read)
    site.control(command({}, "resume", "runaway") | {"ts": 1})
    site.pub.publish(site.t.control("agents", "desired"), b"{", qos=1)
    assert wait_until(lambda: len(site.dead()) == 1, 15)
    site.wait_reported("runaway", lambda r: r["state"] == "halted")
    site.control(command({}, "resume", "runaway") | {"ts": time.time_ns()})
    site.wait_reported("runaway", lambda r: r["state"] == "running")
    assert [d["kind"] for d in site.decisions("runaway")] == []  # since forget(): nothing decided


def test_steps_per_task_halts_an_agent_acting_on_its_own_results(
    site_of: Callable[..., Site], settings: OutpostSettings
) -> None:
    loop = every_agent(
        sense=["inference/shelf-stock/+", "actions/+/results"],
        rules=[
            {"when": {"kind": "score"}, "do": ["notify.staff"], "args": {"d": "{device}"}},
            {"when": {"kind": "result", "outcome": "done"}, "do": ["notify.staff"], "args": {"again": True}},
        ],
        limits={"steps_per_task": 3, "actions_per_minute": 100},
    )
    conn = FakeConnector(settings, "notify")
    try:
        site = site_of(loop=loop)
        site.score("shelf-1")
        assert wait_until(lambda: any(d["kind"] == "halt" for d in site.decisions("loop")), 15)
        site.wait_reported("loop", lambda r: r["state"] == "halted")
        ds = site.decisions("loop")
        assert [d["kind"] for d in ds] == ["act", "act", "act", "halt"]
        assert len({d["task"] for d in ds}) == 1 and "steps_per_task" in ds[3]["reason"]
        assert len(conn.keys) == 3
    finally:
        conn.stop()


# --- people in the loop ----------------------------------------------------------------------------


def test_an_escalation_survives_a_restart_and_its_reply_applies_once(site_of: Callable[..., Site]) -> None:
    site = site_of(restock=reorder_agent())
    s = site.score("shelf-1", confidence=0.5)
    assert wait_until(lambda: len(site.escalations("restock")) == 1, 15)
    esc = site.escalations("restock")[0]
    assert esc["options"] == ["approve", "reject", "edit"] and esc["trace"] == s["trace"]
    assert site.decisions("restock")[0]["kind"] == "escalate"
    assert site.actions("inventory") == []
    site.restart()
    site.wait_reported("restock", lambda r: r["escalations_open"] == 1)
    rid = site.reply("restock", esc["decision"], "approve")
    site.reply("restock", esc["decision"], "approve", rid=rid)  # the same reply, redelivered
    assert wait_until(lambda: len(site.keys("inventory")) == 1, 15)
    site.reply("restock", esc["decision"], "reject")  # a second answer
    assert wait_until(lambda: any(d["reason"] == "already_answered" for d in site.dead()), 15)
    site.restart()
    site.reply("restock", esc["decision"], "approve", rid=rid)  # redelivered after a restart
    site.reply("restock", esc["decision"], "edit", args={"shelf": "x", "quantity": 1})
    assert wait_until(lambda: sum(d["reason"] == "already_answered" for d in site.dead()) == 2, 15)
    r = site.wait_reported("restock", lambda r: r["answered"] == 1)
    assert r["escalations_open"] == 0 and r["override_rate"] == 0.0
    assert len(site.keys("inventory")) == 1
    assert all(a["args"] == {"shelf": "shelf-1", "quantity": 5} for a in site.actions("inventory"))
    kinds = rows(site.settings, "SELECT kind FROM decisions ORDER BY ts")
    assert kinds == [("escalate",), ("act",)]


def test_edit_applies_the_edited_args_reject_acts_not_and_overrides_are_measured(
    site_of: Callable[..., Site],
) -> None:
    site = site_of(restock=reorder_agent())
    for i in range(3):
        site.score(f"shelf-{i}", confidence=0.5)
    assert wait_until(lambda: len(site.escalations("restock")) == 3, 15)
    by_device = {
        e["question"].split('"shelf":"')[1].split('"')[0]: e["decision"] for e in site.escalations("restock")
    }
    site.reply("restock", by_device["shelf-0"], "approve")
    site.reply("restock", by_device["shelf-1"], "edit", args={"shelf": "shelf-1", "quantity": 50})
    site.reply("restock", by_device["shelf-2"], "reject")
    r = site.wait_reported("restock", lambda r: r["answered"] == 3)
    assert r["override_rate"] == round(2 / 3, 4) and r["escalations_open"] == 0
    # the same on metrics/agents, as the telemetry service rolls them up
    c = site.wait_metrics(lambda m: m["counters"].get("answered.restock") == 3)["counters"]
    assert c["overrides.restock"] == 2 and c["escalations.restock"] == 3
    assert wait_until(lambda: len(site.keys("inventory")) == 2, 15)
    quantities = {a["key"]: a["args"]["quantity"] for a in site.actions("inventory")}
    assert sorted(quantities.values()) == [5, 50]
    follow = {
        d["id"]: d["kind"]
        for d in site.decisions("restock")
        if d["id"] in {derived_id(x, "answer") for x in by_device.values()}
    }
    assert follow == {
        derived_id(by_device["shelf-0"], "answer"): "act",
        derived_id(by_device["shelf-1"], "answer"): "act",
        derived_id(by_device["shelf-2"], "answer"): "ignore",
    }


def test_a_timeout_applies_the_safe_default(site_of: Callable[..., Site]) -> None:
    site = site_of(
        yes=reorder_agent(escalation={"below": 0.8, "timeout_s": 1, "on_timeout": "approve"}),
        no=reorder_agent(escalation={"below": 0.8, "timeout_s": 1, "on_timeout": "reject"}),
    )
    site.score("shelf-1", confidence=0.5)
    assert wait_until(lambda: len(site.escalations("yes")) == 1 and len(site.escalations("no")) == 1, 15)
    site.wait_reported("yes", lambda r: r["timeouts"] == 1)
    site.wait_reported("no", lambda r: r["timeouts"] == 1)
    assert wait_until(lambda: len(site.decisions("no")) == 2, 15)
    assert [d["kind"] for d in site.decisions("yes")] == ["escalate", "act"]
    assert [d["kind"] for d in site.decisions("no")] == ["escalate", "ignore"]
    assert len(site.keys("inventory")) == 1
    assert {a["agent"] for a in site.actions("inventory")} == {"yes"}
    # a late answer is dead-lettered, not applied
    site.reply("no", site.escalations("no")[0]["decision"], "approve")
    assert wait_until(lambda: any(d["reason"] == "already_answered" for d in site.dead()), 15)
    assert site.reported("no")["answered"] == 0 and site.reported("no")["override_rate"] is None
    # a timeout is no person's answer: not in answered (nor overrides), in escalation_timeouts
    site.wait_metrics(
        lambda m: (
            m["counters"].get("escalation_timeouts.no") == m["counters"].get("escalation_timeouts.yes") == 1
        )
    )
    c = site.metrics()[-1]["counters"]
    assert not {k for k in c if k.startswith(("answered.", "overrides."))}


# --- breaker, dry run, the outbox ------------------------------------------------------------------


def test_failing_results_open_the_breaker_and_the_next_ask_escalates(
    site_of: Callable[..., Site], settings: OutpostSettings
) -> None:
    conn = FakeConnector(settings, "notify", outcome="failed")
    try:
        site = site_of(flaky=every_agent(breaker={"failures": 2, "cool_s": 600}))
        site.score("shelf-1")
        site.score("shelf-2")
        r = site.wait_reported("flaky", lambda r: "notify.staff" in r["breakers"])
        assert r["success_rate"] == 0.0
        site.score("shelf-3")
        assert wait_until(lambda: len(site.escalations("flaky")) == 1, 15)
        assert [d["kind"] for d in site.decisions("flaky")] == ["act", "act", "escalate"]
        assert "breaker open" in site.escalations("flaky")[0]["question"]
        assert len(conn.keys) == 2
    finally:
        conn.stop()


def test_dry_run_decides_and_never_acts(site_of: Callable[..., Site]) -> None:
    site = site_of(dry=reorder_agent(dry_run=True))
    site.score("shelf-1")
    assert wait_until(lambda: len(site.decisions("dry")) == 1, 15)
    d = site.decisions("dry")[0]
    assert (d["kind"], d["dry_run"]) == ("act", True)
    assert rows(site.settings, "SELECT COUNT(*) FROM actions") == [(0,)]
    r = site.wait_reported("dry", lambda r: r["decisions"] == 1)
    assert r["dry_run"] is True
    assert site.actions("inventory") == []


def test_with_no_connector_requests_wait_in_the_outbox_and_are_resent_at_once_after_a_restart(
    site_of: Callable[..., Site], settings: OutpostSettings
) -> None:
    settings.agents.resend_s = 0.3
    site = site_of(restock=reorder_agent())
    s = site.score("shelf-1")
    assert wait_until(lambda: len(site.actions("inventory")) >= 3, 15)
    assert site.keys("inventory") == {derived_id(derived_id("restock", s["id"], "0"), "action")}
    (state, attempts), *_ = rows(settings, "SELECT state, attempts FROM actions")
    assert state == "pending" and attempts >= 3
    site.stop()
    settings.agents.resend_s = 3600
    before = len(site.actions("inventory"))
    site.start()
    assert wait_until(lambda: len(site.actions("inventory")) > before, 15)
    assert len(site.keys("inventory")) == 1
    assert rows(settings, "SELECT COUNT(*) FROM decisions") == [(1,)]


# --- hostile input ---------------------------------------------------------------------------------


def test_hostile_input_is_dead_lettered_and_the_service_carries_on(site_of: Callable[..., Site]) -> None:
    site = site_of(restock=reorder_agent())
    t = site.t
    site.pub.publish(t.escalation_reply("restock", "abc123"), b"{not json", qos=1)
    site.reply("restock", "abc123", "approve")
    site.reply("nobody", "abc123", "approve")
    site.pub.publish(t.control("agents", "desired"), b"[1, 2]", qos=1)
    site.pub.publish(t.control("agents", "desired"), b"{nope", qos=1)
    site.pub.publish(t.control("agents", "desired"), orjson.dumps({"all": "asleep"}), qos=1)
    site.pub.publish(t.control("agents", "desired"), orjson.dumps({"resume": "x", "ts": 1}), qos=1)
    site.pub.publish(t.control("agents", "desired"), orjson.dumps({"agents": ["restock"]}), qos=1)
    site.pub.publish(t.control("agents", "desired"), orjson.dumps({"agents": {"restock": 3}}), qos=1)

    def reasons() -> list[str]:
        return sorted(d["reason"] for d in site.dead())

    site.pub.publish(
        t.escalation_reply("restock", "abc123"), orjson.dumps({**header(""), "choice": "x"}), qos=1
    )
    site.pub.publish(t.action_results("inventory"), b"\xff\xfe", qos=1)
    unknown = {**header(""), "key": "k1", "request": "r1", "outcome": "done", "attempts": 1}
    site.pub.publish(t.action_results("inventory"), orjson.dumps(unknown), qos=1)  # another's: counted
    want = sorted(
        ["not_json", "unknown_escalation", "unknown_escalation", "missing_field", "not_json"]
        + ["bad_control"] * 6
    )
    assert wait_until(lambda: reasons() == want, 15), reasons()
    # a reply with a choice not offered
    s = site.score("shelf-1", confidence=0.5)
    assert wait_until(lambda: len(site.escalations("restock")) == 1, 15)
    decision = site.escalations("restock")[0]["decision"]
    site.reply("restock", decision, "maybe")
    site.reply("restock", decision, "edit")  # edit without args
    assert wait_until(lambda: reasons().count("bad_choice") == 2, 15), reasons()
    # still running, still deciding
    assert site.svc is not None and site.svc.thread.is_alive()
    site.score("shelf-2")
    assert wait_until(lambda: len(site.keys("inventory")) == 1, 15)
    assert site.actions("inventory")[0]["trace"] != s["trace"]


def test_a_redelivered_input_republishes_its_decision_even_when_its_rule_now_rests(
    site_of: Callable[..., Site],
) -> None:
    """What a crash between the commit and the publish leaves: the decision and its escalation in
    agent.db, the input not acknowledged, so the broker sends it again. The rule's cooldown (in the
    committed state) must not swallow it: the stored messages go out, nothing is decided twice."""
    spec = reorder_agent()
    rule = spec.rules[0].model_copy(update={"cooldown_s": 600.0})
    site = site_of(restock=spec.model_copy(update={"rules": [rule]}))
    s = make_score("shelf-1", confidence=0.5)
    topic = site.t.inference("shelf-stock", "shelf-1")
    site.pub.publish(topic, orjson.dumps([s]), qos=1)
    assert wait_until(lambda: len(site.escalations("restock")) == 1, 15)
    site.restart()
    site.forget()
    site.pub.publish(topic, orjson.dumps([s]), qos=1)  # the broker's redelivery, same bytes
    assert wait_until(lambda: len(site.escalations("restock")) == 1, 15)
    assert [d["kind"] for d in site.decisions("restock")] == ["escalate"]
    assert rows(site.settings, "SELECT COUNT(*) FROM decisions") == [(1,)]
    assert rows(site.settings, "SELECT COUNT(*) FROM escalations") == [(1,)]


def test_a_timeouts_safe_default_stays_within_the_budget(site_of: Callable[..., Site]) -> None:
    """A runaway whose asks all go to a person (low confidence) with on_timeout approve: the
    timeouts act no more than actions_per_minute allows; the rest are recorded, not acted."""
    site = site_of(
        unsure=every_agent(
            rules=[
                {
                    "when": {"kind": "score"},
                    "do": ["notify.staff"],
                    "args": {"d": "{device}"},
                    "confidence": 0.2,
                }
            ],
            escalation={"below": 0.5, "timeout_s": 1, "on_timeout": "approve"},
            limits={"actions_per_minute": 2},
        )
    )
    for i in range(5):
        site.score(f"shelf-{i}")
    site.wait_reported("unsure", lambda r: r["timeouts"] == 5)
    assert wait_until(lambda: len(site.decisions("unsure")) == 10, 15)
    kinds = [d["kind"] for d in site.decisions("unsure")[5:]]
    assert sorted(kinds) == ["act", "act", "ignore", "ignore", "ignore"]
    assert len(site.keys("notify")) == 2


def test_cost_per_hour_halts_within_one_step(site_of: Callable[..., Site]) -> None:
    site = site_of(spender=every_agent(costs={"notify.staff": 1.0}, limits={"cost_per_hour": 2.5}))
    for i in range(4):
        site.score(f"shelf-{i}")
    r = site.wait_reported("spender", lambda r: r["state"] == "halted")
    assert r["cost_last_hour"] == 2.0 and r["breaches"] == 1
    assert wait_until(lambda: len(site.decisions("spender")) == 3, 15)
    ds = site.decisions("spender")
    assert [d["kind"] for d in ds] == ["act", "act", "halt"] and "cost_per_hour" in ds[2]["reason"]
    assert len(site.keys("notify")) == 2


def test_the_breaker_half_opens_after_cooling_and_a_good_trial_closes_it(
    site_of: Callable[..., Site], settings: OutpostSettings
) -> None:
    conn = FakeConnector(settings, "notify", outcome="failed")
    try:
        site = site_of(flaky=every_agent(breaker={"failures": 1, "cool_s": 1}))
        site.score("shelf-1")
        site.wait_reported("flaky", lambda r: "notify.staff" in r["breakers"])
        site.score("shelf-2")
        assert wait_until(lambda: len(site.escalations("flaky")) == 1, 15)
        conn.outcome = "done"
        site.wait_reported("flaky", lambda r: r["breakers"].get("notify.staff") == 0)
        site.score("shelf-3")  # the one trial
        site.wait_reported("flaky", lambda r: r["breakers"] == {})
        site.score("shelf-4")
        assert wait_until(lambda: len(site.decisions("flaky")) == 4, 15)
        assert [d["kind"] for d in site.decisions("flaky")] == ["act", "escalate", "act", "act"]
        assert len(conn.keys) == 3
    finally:
        conn.stop()


def test_a_protected_capability_always_asks_a_person(site_of: Callable[..., Site]) -> None:
    site = site_of(restock=reorder_agent(escalation={"below": 0.1, "protected": ["inventory.reorder"]}))
    site.score("shelf-1", confidence=1.0)
    assert wait_until(lambda: len(site.escalations("restock")) == 1, 15)
    assert "inventory.reorder is protected" in site.escalations("restock")[0]["question"]
    assert [d["kind"] for d in site.decisions("restock")] == ["escalate"]


def test_drifted_inputs_go_to_a_person(site_of: Callable[..., Site]) -> None:
    site = site_of(
        watcher=every_agent(drift={"baseline": 20, "window": 20}, limits={"actions_per_minute": 1000})
    )
    for i in range(20):
        site.score(f"shelf-{i}", alert=False)  # score 0.1: the baseline
    for i in range(20):
        site.score(f"shelf-{i}", alert=True)  # score 0.9
    assert wait_until(lambda: len(site.decisions("watcher")) == 40, 15)
    assert wait_until(lambda: len(site.escalations("watcher")) >= 1, 15)
    assert site.decisions("watcher")[-1]["kind"] == "escalate"
    assert "inputs drifted" in site.escalations("watcher")[-1]["question"]
    site.wait_reported("watcher", lambda r: r["drift"]["drifted"] is True)


def test_cost_and_decision_latency_are_counted_per_agent(
    site_of: Callable[..., Site], settings: OutpostSettings
) -> None:
    """``cost_millis.{agent}``: the settled actions' cost (the result's, else the declared one), in
    thousandths, beside ``decisions.{agent}.{kind}``; ``decision_latency.{agent}`` runs from the
    reading's arrival at ingest (``ingest_ns``), not from the score's arrival at the agent."""
    conn = FakeConnector(settings, "inventory", cost=0.25)  # reorder reports what it cost
    notify = FakeConnector(settings, "notify")  # notify reports nothing: its declared cost counts
    try:
        site = site_of(
            restock=reorder_agent(),
            spender=every_agent(sense=["inference/other/+"], costs={"notify.staff": 0.0025}),
        )
        for i in range(3):
            site.score(f"shelf-{i}")
        late = make_score("shelf-9", model="other")
        late["ingest_ns"] = late["ts"] - 5 * 10**9  # its reading reached ingest 5 s ago
        site.pub.publish(site.t.inference("other", "shelf-9"), orjson.dumps([late]), qos=1)
        site.score("shelf-8", model="other")

        def settled(m: dict[str, Any]) -> bool:
            c: dict[str, int] = m["counters"]
            return c.get("results.restock.done") == 3 and c.get("results.spender.done") == 2

        c = site.wait_metrics(settled)["counters"]
        assert c["cost_millis.restock"] == 750 and c["decisions.restock.act"] == 3
        assert c["cost_millis.spender"] == 5 and c["decisions.spender.act"] == 2
        last = site.metrics()[-1]
        assert last["histograms"]["decision_latency.restock"]["count"] == 3
        spent = last["histograms"]["decision_latency.spender"]
        assert spent["count"] == 2 and spent["max_ms"] >= 5000
    finally:
        conn.stop()
        notify.stop()


def test_batched_asks_become_one_action_also_across_a_restart(site_of: Callable[..., Site]) -> None:
    spec = AgentSpec.model_validate(
        {
            "sense": ["events/+"],
            "rules": [
                {
                    "when": {"metric": "sale_amount", "value": {"ge": 40.0}},
                    "do": ["notify.customer"],
                    "args": {"till": "{device}", "amount": "{value}"},
                    "batch": 3,
                    "batch_wait_s": 5,
                }
            ],
            "may": ["notify.customer"],
            "escalation": {"below": 0.5},
            "drift": {"enabled": False},
        }
    )
    site = site_of(thanks=spec)
    seq = iter(range(1, 100))

    def sale(till: str, amount: float) -> None:
        ev = make_event(till, next(seq), "sale_amount", amount, unit="EUR")
        site.pub.publish(site.t.events(till), orjson.dumps([ev]), qos=1)

    sale("till-1", 50.0)
    sale("till-1", 10.0)  # too small: not asked
    sale("till-2", 45.5)
    assert wait_until(lambda: rows(site.settings, "SELECT COUNT(*) FROM batched") == [(2,)], 15)
    site.restart()
    site.forget()
    sale("till-3", 99.0)
    assert wait_until(lambda: len(site.actions("notify")) >= 1, 15), (
        site.decisions("thanks"),
        site.dead(),
        rows(site.settings, "SELECT * FROM batched"),
        site.reported("thanks"),
    )
    req = site.actions("notify")[0]
    assert req["args"]["count"] == 3
    assert [i["amount"] for i in req["args"]["items"]] == [50.0, 45.5, 99.0]
    # a partial batch goes after batch_wait_s
    sale("till-4", 41.0)
    assert wait_until(lambda: len(site.keys("notify")) == 2, 15)
    last = [a for a in site.actions("notify") if a["args"]["count"] == 1]
    assert last and last[0]["args"]["items"] == [{"till": "till-4", "amount": 41.0}]
    assert rows(site.settings, "SELECT COUNT(*) FROM batched") == [(0,)]
    # each batched decision's latency runs from the first of its readings known to have arrived
    # (the two restored from before the restart are not known; till-3's is)
    site.wait_metrics(
        lambda m: bool((m["histograms"].get("decision_latency.thanks") or {}).get("count") == 2)
    )
    # a partial batch restored after a restart still goes after its rule's batch_wait_s
    sale("till-5", 42.0)
    assert wait_until(lambda: rows(site.settings, "SELECT COUNT(*) FROM batched") == [(1,)], 15)
    site.restart()
    assert wait_until(lambda: len(site.keys("notify")) == 3, 15)


def test_keep_halted_and_an_unanswered_resume_keep_the_agent_halted(site_of: Callable[..., Site]) -> None:
    site = site_of(
        a=every_agent(limits={"actions_per_minute": 1}),
        b=every_agent(limits={"actions_per_minute": 1}, escalation={"below": 0.5, "timeout_s": 1}),
    )
    site.score("shelf-1")
    site.score("shelf-2")
    site.wait_reported("a", lambda r: r["state"] == "halted")
    site.wait_reported("b", lambda r: r["state"] == "halted")
    assert wait_until(lambda: len(site.escalations("a")) == 1, 15)
    site.reply("a", site.escalations("a")[0]["decision"], "keep-halted")
    site.wait_reported("a", lambda r: r["escalations_open"] == 0)
    r = site.wait_reported("b", lambda r: r["timeouts"] == 1 and r["escalations_open"] == 0)
    assert r["state"] == "halted"  # nobody answered: the default keeps it halted
    site.reply("b", site.escalations("b")[0]["decision"], "resume")  # too late
    assert wait_until(lambda: [d["reason"] for d in site.dead()] == ["already_answered"], 15)
    assert site.reported("a")["state"] == "halted" and site.reported("b")["state"] == "halted"
    assert len(site.keys("notify")) == 2
