"""The operator's side of the agent service, as an operator runs it: the ``outpost`` command (a
subprocess) against a real Mosquitto, with the agent and memory services running in-process on the
same site file. ``outpost agents`` lists, stops and resumes; ``outpost escalations`` answers (once);
``outpost log trace`` shows a reading's whole chain; ``outpost replay`` reports no difference for
the policy that decided and exactly the expected ones for a changed policy."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from outpost.broker import Mosquitto
from outpost.bus import Bus
from outpost.contracts import derived_id, header
from outpost.services.agent.report import db_path, open_ro
from outpost.services.agent.service import run as run_agents
from outpost.services.memory.oplog import OpLog
from outpost.services.memory.service import run as run_memory
from outpost.services.registry import OutpostSettings, load_settings
from tests.conftest import ServiceThread, make_event, outpost, wait_status, wait_until

pytestmark = pytest.mark.integration

RESTOCK: dict[str, Any] = {
    "sense": ["events/+", "inference/shelf-stock/+"],
    "rules": [
        {
            "name": "shelf low",
            "when": {
                "kind": "score",
                "label": {"in": ["low", "empty"]},
                "feature.shelf_weight": {"lt": 15.0},
            },
            "do": ["inventory.reorder"],
            "args": {"shelf": "{device}", "weight_kg": "{feature.shelf_weight}", "quantity": 24},
        }
    ],
    "may": ["inventory.reorder"],
    "limits": {"actions_per_minute": 1000, "cost_per_hour": 1000},
    "escalation": {"below": 0.8, "timeout_s": 600},
    "drift": {"enabled": False},
}
"""Acts on a low shelf under 15 kg; asks a person under confidence 0.8."""

# device i: its last shelf weight (kg) and the stock classifier's confidence in "low"
WEIGHTS = [5.0, 8.0, 12.0, 14.0, 20.0, 3.0, 11.0, 9.0, 16.0, 13.0]
CONFIDENCE = [0.95, 0.85, 0.95, 0.75, 0.95, 0.82, 0.9, 0.7, 0.95, 0.88]


@dataclass
class Site:
    settings: OutpostSettings
    env: dict[str, str]
    cwd: Path
    scores: list[dict[str, Any]]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return outpost(*args, env=self.env, cwd=self.cwd)

    def json(self, *args: str) -> Any:
        r = self.cli(*args, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        return orjson.loads(r.stdout.strip().splitlines()[-1])

    def decision(self, device: int) -> str:
        return derived_id("restock", self.scores[device]["id"], "0")


def _score(device: str, n: int, confidence: float, trace: str) -> dict[str, Any]:
    ts = time.time_ns()
    return {
        "v": 1, "id": f"s-{device}-{n}", "ts": ts, "trace": trace, "event": trace, "device": device,
        "model": "shelf-stock", "version": "1.0.0", "backend": "onnxruntime-cpu", "score": 0.9,
        "label": "low", "confidence": confidence, "alert": True, "queue_ms": 0.1, "compute_ms": 0.1,
        "batch": 1, "ingest_ns": ts,
    }  # fmt: skip


def _decisions(settings: OutpostSettings) -> list[tuple[Any, ...]]:
    path = db_path(Path(settings.data_dir), settings.site)
    if not path.is_file():
        return []
    db = open_ro(path)
    try:
        return db.execute("SELECT id, kind FROM decisions WHERE agent = 'restock'").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def _logged(settings: OutpostSettings, *kinds: str) -> int:
    path = Path(settings.data_dir) / "sites" / settings.site / "memory" / "oplog.db"
    if not path.is_file():
        return 0
    log = OpLog(path, synchronous="NORMAL")
    try:
        return sum(len(log.replay(kind=k)) for k in kinds)
    finally:
        log.close()


@pytest.fixture
def running(broker: Mosquitto, tmp_path: Path, site: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    """The site file, agents and memory running on it, and the readings' events and scores
    published (each device: its shelf weight event, then its score)."""
    site_file = tmp_path / "outpost.yaml"
    site_file.write_text(
        yaml.safe_dump(
            {
                "site": site,
                "data_dir": str(tmp_path / "data"),
                "mqtt": {"port": broker.port},
                "memory": {"text_embeddings": False},
                "agents": {"packs": [], "declared": {"restock": RESTOCK}, "report_s": 0.2, "check_s": 0.1},
            }
        )
    )
    monkeypatch.setenv("OUTPOST_CONFIG", str(site_file))
    settings = load_settings()
    memory = ServiceThread(run_memory, settings).start()
    agents = ServiceThread(run_agents, settings).start()
    wait_status(settings, "memory")
    wait_status(settings, "agents")
    t = settings.topics
    pub = Bus(settings.mqtt, client_id=f"pub-{site}")
    pub.start()
    scores = []
    for i, (w, c) in enumerate(zip(WEIGHTS, CONFIDENCE, strict=True)):
        device = f"shelf-{i}"
        ev = make_event(device, 1, "shelf_weight", w)
        pub.publish(t.events(device), orjson.dumps([ev]), qos=1)
        score = _score(device, 1, c, ev["trace"])
        pub.publish(t.inference("shelf-stock", device), orjson.dumps([score]), qos=1)
        scores.append(score)
    assert pub.drain(10)
    pub.stop()
    acting = sum(1 for w in WEIGHTS if w < 15)
    assert wait_until(lambda: len(_decisions(settings)) == acting, 30), _decisions(settings)
    assert wait_until(
        lambda: _logged(settings, "event", "score", "decision") == 2 * len(WEIGHTS) + acting, 30
    )
    env = {**os.environ, "OUTPOST_CONFIG": str(site_file)}
    try:
        yield Site(settings, env, tmp_path, scores)
    finally:
        if agents.thread.is_alive():
            agents.stop()
        if memory.thread.is_alive():
            memory.stop()


def test_replay_is_faithful_and_finds_exactly_the_changed_decisions(running: Site, tmp_path: Path) -> None:
    same = running.json("replay", "--agent", "restock")
    assert same["inputs"] == 2 * len(WEIGHTS)
    assert same["decisions_taken"] == same["decisions_replayed"] == sum(1 for w in WEIGHTS if w < 15)
    assert (same["same"], same["differ"], same["only_taken"], same["only_new"]) == (8, 0, 0, 0)
    assert "not replayed" in running.cli("replay", "--agent", "restock").stdout
    # its progress is on stderr, also when rich draws (a terminal); stdout ends with the JSON object
    drawn = outpost(
        "replay", "--agent", "restock", "--json", env={**running.env, "FORCE_COLOR": "1"}, cwd=running.cwd
    )
    assert drawn.returncode == 0, drawn.stderr
    assert orjson.loads(drawn.stdout.strip().splitlines()[-1])["same"] == 8
    assert (
        "reading the operational log" in drawn.stderr
        and f"comparing {2 * len(WEIGHTS)} inputs" in drawn.stderr
    )
    assert "reading the operational log" not in drawn.stdout and "\x1b[?25l" not in drawn.stdout

    # the same policy from a file, over a time range that holds everything
    policy = tmp_path / "same.yaml"
    policy.write_text(yaml.safe_dump({"restock": RESTOCK}))
    again = running.json("replay", "--agent", "restock", "--policy", str(policy), "--from", "-1h")
    assert (again["same"], again["differ"], again["only_taken"], again["only_new"]) == (8, 0, 0, 0)

    # a stricter policy: reorders under 10 kg only, asks a person under confidence 0.9
    changed = orjson.loads(orjson.dumps(RESTOCK))
    changed["rules"][0]["when"]["feature.shelf_weight"] = {"lt": 10.0}
    changed["escalation"]["below"] = 0.9
    policy.write_text(yaml.safe_dump(changed))
    r = running.json("replay", "--agent", "restock", "--policy", str(policy))
    # under 10 kg: 0 acts as before, 7 escalates as before; 1 and 5 (0.85, 0.82) now escalate;
    # 10-15 kg (2, 3, 6, 9) the new policy leaves alone
    assert (r["same"], r["differ"], r["only_taken"], r["only_new"]) == (2, 2, 4, 0)
    by_what: dict[str, set[str]] = {}
    for d in r["differences"]:
        by_what.setdefault(d["what"], set()).add(d["decision"])
    assert by_what["differ"] == {running.decision(1), running.decision(5)}
    assert by_what["only_taken"] == {running.decision(i) for i in (2, 3, 6, 9)}
    differ = next(d for d in r["differences"] if d["decision"] == running.decision(1))
    assert (differ["taken"]["kind"], differ["would"]["kind"]) == ("act", "escalate")
    assert differ["would"]["capability"] == "inventory.reorder"

    # nothing before the readings
    empty = running.json("replay", "--agent", "restock", "--to", "2000-01-01T00:00:00")
    assert (empty["inputs"], empty["decisions_taken"], empty["decisions_replayed"]) == (0, 0, 0)


def test_replay_refuses_bad_input_clearly(running: Site, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"sense": ["events/+"], "rules": [{"when": {"kind": "event"}, "do": ["x.y"]}]})
    )
    r = running.cli("replay", "--agent", "restock", "--policy", str(bad))
    assert r.returncode == 2 and "rules.0.do" in r.stderr, r.stderr
    r = running.cli("replay", "--agent", "nobody")
    assert r.returncode == 2 and "no agent 'nobody'" in r.stderr, r.stderr
    r = running.cli("replay", "--agent", "restock", "--from", "yesterday")
    assert r.returncode == 2 and "--from must be ISO 8601" in r.stderr, r.stderr


def test_escalations_are_answered_once_and_the_chain_is_in_the_log(running: Site) -> None:
    open_ = running.json("escalations", "list")["escalations"]
    assert {e["decision"] for e in open_} == {running.decision(3), running.decision(7)}
    assert all(e["options"] == ["approve", "reject", "edit"] and e["agent"] == "restock" for e in open_)

    three, seven = running.decision(3), running.decision(7)
    ok = running.json("escalations", "approve", three[:10], "--by", "alice", "--note", "checked the shelf")
    assert (ok["applied"], ok["state"], ok["by"], ok["escalation"]) == (True, "answered", "alice", three)
    again = running.cli("escalations", "reject", three)
    assert again.returncode == 2 and "already answered (approve by alice)" in again.stderr, again.stderr

    nobody = running.cli("escalations", "approve", seven, "--broker", "127.0.0.1:1")
    assert nobody.returncode == 2 and "no broker at 127.0.0.1:1" in nobody.stderr, nobody.stderr
    bad = running.cli("escalations", "edit", seven, "--args", "{quantity: 3")
    assert bad.returncode == 2 and "--args is not JSON" in bad.stderr, bad.stderr
    edited = running.json("escalations", "edit", seven, "--args", '{"shelf": "shelf-7", "quantity": 3}')
    assert edited["applied"] is True
    unknown = running.cli("escalations", "approve", "feedfacefeedface")
    assert unknown.returncode == 2 and "no escalation 'feedfacefeedface'" in unknown.stderr, unknown.stderr

    assert running.json("escalations", "list")["escalations"] == []
    answered = {e["decision"]: e for e in running.json("escalations", "list", "--all")["escalations"]}
    assert (answered[seven]["choice"], answered[seven]["state"]) == ("edit", "answered")

    # the reading's whole chain: event, score, decision, escalation, reply, the decision it led to,
    # the action request
    trace = running.scores[7]["trace"]

    def chain() -> list[str]:
        r = running.cli("log", "trace", trace, "--json")
        return [orjson.loads(line)["kind"] for line in r.stdout.splitlines() if line.startswith("{")]

    want = {"event", "score", "decision", "escalation", "reply", "action"}
    assert wait_until(lambda: want <= set(chain()), 15), chain()
    assert chain().count("decision") == 2
    action = next(
        orjson.loads(line)["body"]
        for line in running.cli("log", "trace", trace, "--json").stdout.splitlines()
        if line.startswith("{") and orjson.loads(line)["kind"] == "action"
    )
    assert action["args"] == {"shelf": "shelf-7", "quantity": 3}
    # the connector's result closes the chain (and the agent counts it)
    result = {
        **header(trace), "key": action["key"], "request": action["id"], "outcome": "done", "attempts": 1,
    }  # fmt: skip
    pub = Bus(running.settings.mqtt, client_id=f"connector-{running.settings.site}")
    pub.start()
    pub.publish(running.settings.topics.action_results("inventory"), orjson.dumps(result), qos=1)
    assert pub.drain(10)
    pub.stop()
    assert wait_until(lambda: "result" in chain(), 15), chain()
    assert wait_until(lambda: running.json("agents", "list")["agents"]["restock"]["success_rate"] == 1.0, 15)

    # a person's answers never count as the policy's decisions in a replay
    r = running.json("replay", "--agent", "restock")
    assert (r["same"], r["differ"], r["only_taken"], r["only_new"]) == (8, 0, 0, 0)


def test_agents_list_stop_and_resume(running: Site) -> None:
    listed = running.json("agents", "list")
    assert listed["source"].startswith("reported by the agent service")
    restock = listed["agents"]["restock"]
    assert restock["state"] == "running"
    assert (restock["decisions"], restock["escalations_open"]) == (8, 2)
    assert restock["actions_per_minute"] == 1000

    r = running.cli("agents", "stop", "restock")
    assert r.returncode == 0 and "restock: stopped" in r.stdout, r.stdout + r.stderr
    assert running.json("agents", "list")["agents"]["restock"]["state"] == "stopped"
    r = running.cli("agents", "pause", "--all")
    assert r.returncode == 0 and "restock: stopped" in r.stdout, r.stdout + r.stderr  # the stricter
    r = running.cli("agents", "resume", "--all")
    assert r.returncode == 0 and "restock: running" in r.stdout, r.stdout + r.stderr

    r = running.cli("agents", "stop", "nobody")
    assert r.returncode == 2 and "no agent 'nobody'" in r.stderr, r.stderr
    r = running.cli("agents", "stop")
    assert r.returncode == 2 and "NAME|--all" in r.stderr, r.stderr
    r = running.cli("agents", "stop", "restock", "--broker", "127.0.0.1:1")
    assert r.returncode == 2 and "no broker at 127.0.0.1:1" in r.stderr, r.stderr


def test_agents_list_reads_agent_db_when_the_site_does_not_run(running: Site) -> None:
    assert running.cli("agents", "pause", "restock").returncode == 0

    def committed() -> str:
        db = open_ro(db_path(Path(running.settings.data_dir), running.settings.site))
        try:
            row = db.execute("SELECT governor FROM agents WHERE name = 'restock'").fetchone()
        finally:
            db.close()
        return str(orjson.loads(row[0])["desired"]) if row else ""

    assert wait_until(lambda: committed() == "paused", 15)
    # no broker there: what agent.db last recorded
    doc = running.json("agents", "list", "--broker", "127.0.0.1:1")
    assert doc["source"].startswith("from agent.db")
    restock = doc["agents"]["restock"]
    assert (restock["state"], restock["decisions"], restock["escalations_open"]) == ("paused", 8, 2)
    assert restock["actions_per_minute"] == 1000


def test_actions_list_says_which_waiting_requests_no_declared_connector_takes(
    tmp_path: Path, site: str
) -> None:
    """Requests the agents hold for a connector the site does not declare: ``outpost actions list``
    names that connector, rather than asking whether the connectors service runs."""
    from outpost.services.agent.store import SCHEMA

    path = db_path(tmp_path, site)
    path.parent.mkdir(parents=True)
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.execute(
        "INSERT INTO actions (key, id, decision, agent, connector, capability, device, trace, created_ns, "
        "sent_ns, attempts, state, detail, cost, payload) VALUES "
        "('k1', 'a1', 'd1', 'restock', 'nowhere', 'store.reorder', 'shelf-1', 't1', 1, 1, 1, 'pending', "
        "NULL, 0, x'7b7d')"
    )
    db.commit()
    db.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
    p = outpost("actions", "list", "--data-dir", str(tmp_path), "--site", site, env=env)
    assert p.returncode == 0, p.stderr
    assert "1 requests wait in the agents' outbox" in p.stdout
    assert "no connector 'nowhere' is declared" in p.stdout, p.stdout
