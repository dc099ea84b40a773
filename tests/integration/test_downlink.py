"""The downlink for real: an edge Mosquitto bridged to a cloud Mosquitto (the lines ``outpost up``
writes), the uplink service on the edge (its :class:`outpost.downlink.Downlink` mounted), with the
users and ACL ``outpost up`` generates (:mod:`outpost.access`), so each publish the downlink makes is
one its user may make. What the cloud sends while the link is down arrives once it is back and is
applied once; an expired command is refused and reported; the agents' desired state reaches
``control/agents/desired``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from outpost.access import OPERATOR, SiteAccess, acl_text, service_user
from outpost.broker import Mosquitto, uplink_bridge
from outpost.bus import Bus
from outpost.contracts import derived_id, header
from outpost.services.registry import OutpostSettings
from outpost.services.uplink.service import Uplink
from outpost.services.uplink.service import run as run_uplink
from outpost.settings import MqttSettings
from outpost.topics import Topics
from tests.conftest import Collector, ServiceThread, wait_status

pytestmark = pytest.mark.integration


@dataclass
class Site:
    topics: Topics
    cloud: Mosquitto
    edge: Mosquitto
    uplink: ServiceThread[Uplink]
    cloud_pub: Bus
    access: SiteAccess

    def send(self, topic: str, doc: dict[str, Any], *, retain: bool = False) -> None:
        """Publish on the cloud broker, confirmed."""
        self.cloud_pub.publish(topic, orjson.dumps(doc), qos=1, retain=retain)
        assert self.cloud_pub.drain(10)

    def as_user(self, user: str) -> MqttSettings:
        return MqttSettings(
            port=self.edge.port, username=user, password=SecretStr(self.access.password(user))
        )

    def on_edge(self, pattern: str, name: str, user: str = service_user("memory")) -> Collector:
        """A durable subscriber on the edge broker (it outlives the edge broker's restart), as a
        user that may read it (the memory service reads what every stage publishes)."""
        return Collector(
            self.as_user(user), pattern, client_id=f"{name}-{self.topics.site}", durable=True
        ).start()

    def on_cloud(self, pattern: str, name: str) -> Collector:
        return Collector(
            MqttSettings(port=self.cloud.port), pattern, client_id=f"{name}-{self.topics.site}"
        ).start()

    def bridge_up(self) -> None:
        state = Collector(
            self.as_user(OPERATOR), self.topics.uplink_state(), client_id=f"st-{self.topics.site}"
        ).start()
        try:
            assert state.wait_for(lambda c: bool(c.messages) and c.messages[-1][1] == b"1")
        finally:
            state.stop()


@pytest.fixture
def site_rig(tmp_path: Path, site: str) -> Iterator[Site]:
    cloud = Mosquitto(tmp_path / "cloud").start()
    settings = OutpostSettings(site=site, data_dir=tmp_path / "data")
    settings.uplink.cloud = cloud.address
    access = SiteAccess.of(tmp_path / "site", settings.topics)
    services = list(OutpostSettings.SERVICES)
    edge = Mosquitto(
        tmp_path / "edge",
        users=access.passwords(services),
        acl=acl_text(access.principals(services)).splitlines(),
        extra_conf=uplink_bridge(settings.topics, settings.uplink),
    ).start()
    settings.mqtt.port = edge.port
    settings.mqtt.username = service_user("uplink")
    settings.mqtt.password = SecretStr(access.password(service_user("uplink")))
    uplink = ServiceThread(run_uplink, settings).start()
    operator = settings.model_copy(deep=True)
    operator.mqtt.username, operator.mqtt.password = OPERATOR, SecretStr(access.password(OPERATOR))
    wait_status(operator, "uplink")
    pub = Bus(MqttSettings(port=cloud.port), client_id=f"cloud-pub-{site}")
    pub.start()
    s = Site(settings.topics, cloud, edge, uplink, pub, access)
    s.bridge_up()
    yield s
    pub.stop()
    uplink.stop()
    edge.stop()
    cloud.stop()


def command(cid: str, expires_ns: int, **fields: Any) -> dict[str, Any]:
    doc = header(id=cid)
    doc.update(expires_ns=expires_ns, **fields)
    return doc


def reply_command(cid: str, expires_ns: int) -> dict[str, Any]:
    return command(cid, expires_ns, to="shelf", decision="d1", body={"choice": "approve", "by": "ops@cloud"})


def test_a_command_sent_while_the_link_is_down_is_applied_once_it_is_back(site_rig: Site) -> None:
    s, t = site_rig, site_rig.topics
    replies = s.on_edge(t.escalation_reply("shelf", "d1"), "replies")
    results = s.on_cloud(t.cmd_results, "results")
    s.edge.stop()  # the link is down: the cloud broker keeps what comes for the bridge's session
    cmd = reply_command("cmd-1", time.time_ns() + 300 * 10**9)
    s.send(t.down_cmd("escalation-reply"), cmd)
    s.send(t.down_cmd("escalation-reply"), cmd)  # the cloud tried again: a copy
    s.edge.start()
    assert results.wait_for(lambda c: len(c.json()) >= 2), results.json()
    assert [r["outcome"] for r in results.json()] == ["applied", "duplicate"]
    assert all(r["command"] == "cmd-1" for r in results.json())
    assert replies.wait_for(lambda c: len(c.json()) >= 1)
    (reply,) = replies.json()  # the copy became nothing locally
    assert reply["choice"] == "approve" and reply["id"] == derived_id("downlink", "cmd-1")
    replies.stop()


def test_an_expired_command_is_refused_and_reported_never_applied(site_rig: Site) -> None:
    s, t = site_rig, site_rig.topics
    actions = s.on_edge(t.all_actions, "actions")
    dlq = s.on_edge(t.dlq("uplink"), "dlq")
    results = s.on_cloud(t.cmd_results, "results")
    body = {"key": "k1", "agent": "cloud", "capability": "notify.staff", "args": {}}
    s.send(t.down_cmd("action"), command("late", time.time_ns() - 10**9, to="email", body=body))
    s.send(t.down_cmd("action"), command("ok", time.time_ns() + 300 * 10**9, to="email", body=body))
    assert results.wait_for(lambda c: len(c.json()) >= 2), results.json()
    assert {r["command"]: r["outcome"] for r in results.json()} == {"late": "expired", "ok": "applied"}
    assert dlq.wait_for(lambda c: any(d["reason"] == "expired" for d in c.json()))
    assert actions.wait_for(lambda c: len(c.json()) >= 1)
    assert [a["id"] for a in actions.json()] == [derived_id("downlink", "ok")]  # in order: late never came
    for c in (actions, dlq):
        c.stop()


def test_a_malformed_command_is_dead_lettered(site_rig: Site) -> None:
    s, t = site_rig, site_rig.topics
    dlq = s.on_edge(t.dlq("uplink"), "dlq")
    results = s.on_cloud(t.cmd_results, "results")
    s.cloud_pub.publish(t.down_cmd("action"), b"{not json", qos=1)
    s.send(t.down_cmd("reboot"), command("r1", time.time_ns() + 10**11, to="x", body={}))
    assert dlq.wait_for(lambda c: len(c.json()) >= 2), dlq.json()
    assert sorted(d["reason"] for d in dlq.json()) == ["bad_command", "not_json"]
    assert results.wait_for(lambda c: len(c.json()) >= 1)
    assert [(r["command"], r["outcome"]) for r in results.json()] == [("r1", "rejected")]
    dlq.stop()


def test_desired_state_for_the_agents_reaches_their_control_topic_only_when_newer(site_rig: Site) -> None:
    s, t = site_rig, site_rig.topics
    control = s.on_edge(t.control("agents", "desired"), "control", OPERATOR)
    down = t.down_desired("agents")
    s.send(down, {"all": "paused", "agents": {}, "ts": 2}, retain=True)
    s.send(down, {"all": "stopped", "agents": {}, "ts": 1}, retain=True)  # older: not applied
    s.send(down, {"all": "running", "agents": {}, "resume": ["*"], "ts": 3}, retain=True)
    assert control.wait_for(lambda c: len(c.json()) >= 2), control.json()
    assert [d["ts"] for d in control.json()] == [2, 3]
    control.stop()
    # retained on the site: what a starting agent service reads
    late = s.on_edge(t.control("agents", "desired"), "late", OPERATOR)
    assert late.wait_for(lambda c: len(c.json()) >= 1)
    assert late.json()[-1]["ts"] == 3
    late.stop()


def test_a_desired_state_the_service_would_refuse_is_refused_here_and_said_upward(site_rig: Site) -> None:
    """The agents' switch is checked against its contract before it is republished: a bad one is
    dead-lettered ``bad_desired`` and its refusal goes up, so the cloud learns of it."""
    s, t = site_rig, site_rig.topics
    control = s.on_edge(t.control("agents", "desired"), "control", OPERATOR)
    dlq = s.on_edge(t.dlq("uplink"), "dlq")
    results = s.on_cloud(t.cmd_results, "results")
    down = t.down_desired("agents")
    s.send(down, {"all": None, "agents": {"restock": "asleep"}, "resume": [], "ts": 5}, retain=True)
    assert results.wait_for(lambda c: len(c.json()) >= 1), results.json()
    (r,) = results.json()
    assert (r["target"], r["outcome"]) == ("desired", "rejected")
    assert "all" in r["detail"] and "agents.restock" in r["detail"] and "pydantic" not in r["detail"]
    assert dlq.wait_for(lambda c: [d["reason"] for d in c.json()] == ["bad_desired"])
    s.send(down, {"all": "running", "agents": {"restock": "paused"}, "resume": [], "ts": 6}, retain=True)
    assert control.wait_for(lambda c: len(c.json()) >= 1)
    assert [d["ts"] for d in control.json()] == [6]  # the refused one never reached the agents
    for c in (control, dlq):
        c.stop()
