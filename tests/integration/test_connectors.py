"""The connector gateway's guarantees against a real HTTP peer (the simulated store API,
outpost.sim.store_api) and a real Mosquitto, through the real Gateway: in-process, and as a process
(``python -m outpost.services.connectors``) where kill -9 and its log output matter.

No timing asserts: waits return as soon as what they wait for holds; where time is the point (a
rate limit, Retry-After) the assertion is on counts or spacing measured by the peer, with slack on
the side that a slow machine cannot break.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from outpost.broker import Mosquitto
from outpost.bus import Bus
from outpost.contracts import header
from outpost.datadir import site_path
from outpost.services.connectors.secrets import SecretStore
from outpost.services.connectors.service import Gateway, run
from outpost.services.connectors.settings import ConnectorsSettings
from outpost.services.registry import OutpostSettings
from outpost.sim.store_api import StoreAPI
from tests.conftest import (
    MB,
    Collector,
    ServiceProcess,
    ServiceThread,
    fill,
    free,
    wait_status,
    wait_until,
)

pytestmark = pytest.mark.integration

WAIT = 60.0
REORDER = {
    "op": {"method": "POST", "path": "/reorders"},
    "input": {
        "type": "object",
        "required": ["shelf", "quantity"],
        "properties": {"shelf": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
    },
}


def store_connector(url: str, **over: Any) -> dict[str, Any]:
    """The ``store`` connector's declaration (inventory.reorder, tickets.open, staff.notify)."""
    spec: dict[str, Any] = {
        "kind": "http",
        "endpoint": {"base_url": url},
        "capabilities": {
            "inventory.reorder": REORDER,
            "tickets.open": {"op": {"method": "POST", "path": "/tickets"}},
            "staff.notify": {"op": {"method": "POST", "path": "/notify"}},
        },
        "timeout_s": 5,
        "retry": {"attempts": 50, "backoff_s": [0.05, 0.5], "max_age_s": 120},
        "rate": {"per_s": 1000, "burst": 1000},
        "concurrency": 4,
        "cost": 0.01,
    }
    spec.update(over)
    return spec


def declare(settings: OutpostSettings, **connectors: dict[str, Any]) -> None:
    settings.connectors = ConnectorsSettings.model_validate({"declared": connectors, "threads": 8})


def request(
    key: str,
    capability: str = "inventory.reorder",
    args: dict[str, Any] | None = None,
    *,
    deadline_ns: int | None = None,
) -> bytes:
    doc: dict[str, Any] = {
        **header(f"trace-{key}"),
        "key": key,
        "agent": "restock",
        "capability": capability,
        "args": {"shelf": "s1", "quantity": 3} if args is None else args,
    }
    if deadline_ns is not None:
        doc["deadline_ns"] = deadline_ns
    return orjson.dumps(doc)


def send(pub: Bus, settings: OutpostSettings, payload: bytes, connector: str = "store") -> None:
    pub.publish(settings.topics.actions(connector), payload, qos=1)


def results(c: Collector) -> dict[str, list[dict[str, Any]]]:
    """Every result seen, by key (a key's result may come more than once: the same outcome)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for doc in c.json():
        out.setdefault(doc["key"], []).append(doc)
    return out


def final(c: Collector) -> dict[str, str]:
    """key -> its outcome; a key whose results disagree fails the test."""
    out: dict[str, str] = {}
    for key, docs in results(c).items():
        outcomes = {d["outcome"] for d in docs}
        assert len(outcomes) == 1, f"{key}: results disagree: {outcomes}"
        out[key] = outcomes.pop()
    return out


def dead(c: Collector) -> list[dict[str, Any]]:
    return c.json()


@pytest.fixture
def api() -> Iterator[StoreAPI]:
    a = StoreAPI().start()
    yield a
    a.stop()


@pytest.fixture
def gateway(settings: OutpostSettings, broker: Mosquitto) -> Iterator[list[ServiceThread[Gateway]]]:
    """Start the gateway in-process with ``start_gateway(settings)`` once the test has declared its
    connectors; stopped at the end."""
    started: list[ServiceThread[Gateway]] = []
    yield started
    for g in started:
        if g.thread.is_alive():
            g.stop()


def start_gateway(started: list[ServiceThread[Gateway]], settings: OutpostSettings) -> ServiceThread[Gateway]:
    g = ServiceThread(run, settings).start()
    started.append(g)
    wait_status(settings, "connectors")
    return g


def test_a_site_with_no_connector_leaves_requests_to_the_agents_outbox(
    settings: OutpostSettings, gateway: list[ServiceThread[Gateway]], publisher: Bus
) -> None:
    """No connector declared (the default): the gateway takes no request, so an agent's request is
    neither refused nor dead-lettered (which would count as failures and open its breaker): it stays
    in the agent's outbox, re-sent until a gateway takes it."""
    t = settings.topics
    out = Collector(settings.mqtt, t.all_action_results, client_id="r-" + settings.site).start()
    dlq = Collector(settings.mqtt, t.dlq("connectors"), client_id="d-" + settings.site).start()
    g = start_gateway(gateway, settings)
    send(publisher, settings, request("k-none"), connector="inventory")
    time.sleep(1.0)  # what would have come (a refusal takes milliseconds) has had its time
    assert out.json() == [] and dlq.json() == []
    assert g.stop().metrics.counters["requests"] == 0


# --- duplicates, hostile input -------------------------------------------------------------------
def test_the_same_key_has_one_effect_and_gets_its_stored_result_again(
    settings: OutpostSettings, api: StoreAPI, gateway: list[Any], collect: Any, publisher: Bus
) -> None:
    declare(settings, store=store_connector(api.url))
    start_gateway(gateway, settings)
    res = collect(settings.topics.all_action_results)
    send(publisher, settings, request("dup-1"))
    send(publisher, settings, request("dup-1"))  # a resend while it is queued or in flight
    assert res.wait_for(lambda c: "dup-1" in results(c), WAIT)
    send(publisher, settings, request("dup-1"))  # and once it is done: the stored result again
    assert res.wait_for(lambda c: len(results(c)["dup-1"]) >= 2, WAIT)
    docs = results(res)["dup-1"]
    assert {d["outcome"] for d in docs} == {"done"}
    assert all(d == docs[0] for d in docs), "the stored result is published again, byte for byte"
    assert docs[0]["result"]["key"] == "dup-1" and docs[0]["attempts"] == 1
    assert api.effects()["dup-1"]["effects"] == 1
    assert api.effects()["dup-1"]["requests"] == 1, "the copies never reached the peer"


def test_hostile_input_is_refused_and_dead_lettered_without_a_crash(
    settings: OutpostSettings, api: StoreAPI, gateway: list[Any], collect: Any, publisher: Bus
) -> None:
    declare(settings, store=store_connector(api.url))
    g = start_gateway(gateway, settings)
    res = collect(settings.topics.all_action_results)
    dlq = collect(settings.topics.dlq("connectors"))
    topic = settings.topics.actions("store")
    publisher.publish(topic, b"{not json", qos=1)
    wrong = orjson.loads(request("h-types"))
    wrong["key"], wrong["args"] = 7, "not an object"
    publisher.publish(topic, orjson.dumps(wrong), qos=1)
    send(publisher, settings, request("h-conn", "nothing.here"), connector="nowhere")
    send(publisher, settings, request("h-cap", "nothing.here"))
    send(publisher, settings, request("h-args", args={"shelf": "s1", "quantity": "three"}))
    send(publisher, settings, request("h-missing", args={"quantity": 2}))
    send(publisher, settings, request("h-late", deadline_ns=time.time_ns() - 10**9))
    send(publisher, settings, request("h-good"))
    publisher.publish(topic, b"{" + b" " * 4_000_001 + b"}", qos=1)  # past the 4 MB a message may be
    publisher.publish(settings.topics.root + "/actions/bad.topic", request("h-topic"), qos=1)
    publisher.publish(topic, orjson.dumps([orjson.loads(request("h-batch"))]), qos=1)  # one at a time
    late_agent = {**orjson.loads(request("h-agent")), "agent": "not/a segment"}
    publisher.publish(topic, orjson.dumps(late_agent), qos=1)
    expected = {
        "h-conn": ("refused", "unknown_connector"),
        "h-cap": ("refused", "unknown_capability"),
        "h-args": ("refused", "bad_args"),
        "h-missing": ("refused", "bad_args"),
        "h-late": ("expired", "expired"),
    }
    assert res.wait_for(lambda c: set(final(c)) >= {*expected, "h-good"}, WAIT), results(res)
    assert dlq.wait_for(lambda c: len(c.json()) >= len(expected) + 6, WAIT), dlq.json()
    got = final(res)
    assert got["h-good"] == "done"
    assert not {"h-topic", "h-batch", "h-agent"} & set(got)
    for key, (outcome, _) in expected.items():
        assert got[key] == outcome, (key, results(res)[key])
    reasons = sorted(d["reason"] for d in dead(dlq))
    kit = ["not_json", "wrong_type", "too_large", "bad_topic", "wrong_shape", "bad_identifier"]
    want = sorted([r for _, r in expected.values()] + kit)
    assert reasons == want, reasons
    assert set(api.effects()) == {"h-good"}, "nothing refused reached the peer"
    assert g.thread.is_alive()
    gw = g.stop()
    assert gw.metrics.counters["rejected"] == len(want)


# --- retries: 429 with Retry-After, 5xx, 400 -----------------------------------------------------
def test_429_waits_for_retry_after_5xx_is_retried_and_400_fails_at_once(
    settings: OutpostSettings, api: StoreAPI, gateway: list[Any], collect: Any, publisher: Bus
) -> None:
    declare(settings, store=store_connector(api.url))
    start_gateway(gateway, settings)
    res = collect(settings.topics.all_action_results)
    dlq = collect(settings.topics.dlq("connectors"))

    api.faults(status=429, retry_after=2, count=1)
    send(publisher, settings, request("r-429"))
    assert res.wait_for(lambda c: "r-429" in final(c), WAIT)
    tries = [a for a in api.arrivals() if a["key"] == "r-429"]
    assert [a["status"] for a in tries] == [429, 201]
    waited = (tries[1]["t_ns"] - tries[0]["t_ns"]) / 1e9
    assert waited >= 1.95, f"tried again {waited:.3f} s after a Retry-After of 2 s"

    api.faults(fail_next=3)
    send(publisher, settings, request("r-5xx"))
    assert res.wait_for(lambda c: "r-5xx" in final(c), WAIT)
    assert final(res)["r-5xx"] == "done" and results(res)["r-5xx"][0]["attempts"] == 4
    assert [a["status"] for a in api.arrivals() if a["key"] == "r-5xx"] == [500, 500, 500, 201]

    api.faults(status=400, count=1)
    send(publisher, settings, request("r-400"))
    assert res.wait_for(lambda c: "r-400" in final(c), WAIT)
    doc = results(res)["r-400"][0]
    assert doc["outcome"] == "failed" and doc["attempts"] == 1, doc
    assert "400" in doc["detail"]
    time.sleep(0.5)  # a retry, were there one, would come within the first backoff (0.05 s)
    assert [a["status"] for a in api.arrivals() if a["key"] == "r-400"] == [400]
    assert dlq.wait_for(lambda c: any(d["reason"] == "failed" for d in c.json()), WAIT)
    assert [d["reason"] for d in dead(dlq)] == ["failed"]
    assert {k: e["effects"] for k, e in api.effects().items()} == {"r-429": 1, "r-5xx": 1}


# --- OAuth2 --------------------------------------------------------------------------------------
def test_oauth2_token_is_cached_refreshed_before_expiry_and_refetched_once_when_revoked(
    settings: OutpostSettings, gateway: list[Any], collect: Any, publisher: Bus
) -> None:
    api = StoreAPI(auth=True, client_secret="oauth-client-secret-9f3").start()
    try:
        SecretStore(site_path(settings.data_dir, settings.site, "connectors")).set(
            "store-client", "oauth-client-secret-9f3"
        )
        auth = {
            "kind": "oauth2",
            "token_url": f"{api.url}/oauth/token",
            "client_id": "outpost",
            "client_secret": {"secret": "store-client"},
            "refresh_before_s": 1.5,
        }
        declare(settings, store=store_connector(api.url, endpoint={"base_url": api.url, "auth": auth}))
        start_gateway(gateway, settings)
        res = collect(settings.topics.all_action_results)

        def run_batch(prefix: str, n: int, pause_s: float = 0.0) -> None:
            for i in range(n):
                send(publisher, settings, request(f"{prefix}-{i}"))
                if pause_s:
                    time.sleep(pause_s)
            assert res.wait_for(lambda c: all(f"{prefix}-{i}" in final(c) for i in range(n)), WAIT)

        run_batch("cached", 20)
        assert api.stats()["token_fetches"] == 1, "one token for every call while it is valid"
        assert api.stats()["unauthorized"] == 0

        api.faults(revoke_tokens=True, token_ttl_s=3)
        run_batch("revoked", 1)
        s = api.stats()
        assert s["unauthorized"] == 1 and s["token_fetches"] == 2, s
        assert final(res)["revoked-0"] == "done" and results(res)["revoked-0"][0]["attempts"] == 1

        # tokens now live 3 s and are refreshed 1.5 s before: calls over 5 s never meet an expired one
        run_batch("refresh", 10, pause_s=0.5)
        s = api.stats()
        assert s["unauthorized"] == 1, "a token was used past its expiry"
        assert s["token_fetches"] >= 3, s
        assert set(final(res).values()) == {"done"}
    finally:
        api.stop()


# --- rate limits, order ----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_burst_of_200_is_held_to_the_bucket(
    settings: OutpostSettings, api: StoreAPI, gateway: list[Any], collect: Any, publisher: Bus
) -> None:
    per_s, burst, n = 20.0, 5, 200
    declare(settings, store=store_connector(api.url, rate={"per_s": per_s, "burst": burst}, concurrency=8))
    start_gateway(gateway, settings)
    res = collect(settings.topics.all_action_results)
    for i in range(n):
        send(publisher, settings, request(f"b-{i}"))
    assert res.wait_for(lambda c: len(final(c)) == n, 120), len(final(res))
    assert set(final(res).values()) == {"done"}
    t = sorted(a["t_ns"] / 1e9 for a in api.arrivals())
    assert len(t) == n
    # A token bucket lets at most burst + per_s * w calls through in any window of w seconds. The
    # peer stamps arrivals a little after the gateway took their tokens, so allow a quarter second
    # of jitter and a couple of calls; without the bucket all 200 would arrive within one window.
    for w in (0.5, 1.0, 3.0):
        most = max(sum(1 for x in t[i:] if x < t[i] + w) for i in range(len(t)))
        assert most <= burst + per_s * (w + 0.25) + 2, f"{most} calls within {w} s"
    assert t[-1] - t[0] >= (n - burst) / per_s * 0.9, "the burst went through faster than the rate"


def test_a_full_disk_holds_requests_without_spinning_then_each_is_done_once(
    small_disk: Path, settings: OutpostSettings, api: StoreAPI, collect: Any, publisher: Bus
) -> None:
    """With the outbox's disk full (a real 20 MB tmpfs, filled) requests cannot be put on disk, so
    none is called or acknowledged; the gateway tries again about once a second, sleeping between
    tries (no wake-ups spent on nothing), and once space is freed each request takes effect once."""
    settings.data_dir = small_disk / "data"
    declare(settings, store=store_connector(api.url))
    g = Gateway(settings)
    ticks = 0
    tick = g._tick

    def counted() -> None:
        nonlocal ticks
        ticks += 1
        tick()

    g._tick = counted  # type: ignore[method-assign]
    g.start()
    try:
        wait_status(settings, "connectors")
        res = collect(settings.topics.all_action_results)
        filler = fill(small_disk)
        keys = [f"full-{i}" for i in range(20)]
        for k in keys:
            send(publisher, settings, request(k, args={"shelf": k, "quantity": 1}))
        assert wait_until(lambda: g.metrics.counters["commit_failures"] >= 2, WAIT)
        before, failures = ticks, g.metrics.counters["commit_failures"]
        time.sleep(3.0)
        assert api.arrivals() == [] and res.messages == []
        assert g.metrics.counters["commit_failures"] - failures <= 6  # about one try a second
        assert ticks - before <= 30, f"{ticks - before} turns in 3 s with nothing it could do"
        free(filler, 6 * MB)
        assert res.wait_for(lambda c: set(keys) <= set(final(c)), WAIT), g.metrics.counters
        assert set(final(res)[k] for k in keys) == {"done"}
        effects = api.effects()
        assert {k: effects[k]["effects"] for k in keys} == dict.fromkeys(keys, 1)
    finally:
        g.stop()


def test_requests_with_the_same_order_value_arrive_in_order_despite_failures(
    settings: OutpostSettings, api: StoreAPI, gateway: list[Any], collect: Any, publisher: Bus
) -> None:
    caps = {"inventory.reorder": {**REORDER, "order_by": "shelf"}}
    declare(settings, store=store_connector(api.url, capabilities=caps, concurrency=6))
    start_gateway(gateway, settings)
    res = collect(settings.topics.all_action_results)
    shelves, per = ["a", "b", "c"], 12
    keys = []
    for i in range(per):
        if i in (2, 7):
            api.faults(fail_next=4)  # some calls fail and are tried again while others queue
        if i == 5:
            api.faults(status=429, retry_after=0.3, count=2)
        for s in shelves:
            keys.append(f"o-{s}-{i}")
            send(publisher, settings, request(keys[-1], args={"shelf": s, "quantity": i + 1}))
        time.sleep(0.01)
    assert res.wait_for(lambda c: len(final(c)) == len(keys), WAIT), len(final(res))
    assert set(final(res).values()) == {"done"}
    arrivals = api.arrivals()
    assert any(a["status"] != 201 for a in arrivals), "the faults were met"
    for s in shelves:
        done = [a["body"]["quantity"] for a in arrivals if a["status"] == 201 and a["body"]["shelf"] == s]
        assert done == list(range(1, per + 1)), (s, done)
        tried = [a["body"]["quantity"] for a in arrivals if a["body"]["shelf"] == s]
        assert tried == sorted(tried), f"shelf {s}: a later request overtook a retried one: {tried}"
    assert all(e["effects"] == 1 for e in api.effects().values())


# --- outage, network cut ---------------------------------------------------------------------------
def helpdesk_connector(url: str, max_age_s: float, timeout_s: float = 5.0) -> dict[str, Any]:
    """A second connector on the same peer whose requests may not wait long (``max_age_s``)."""
    return {
        "kind": "http",
        "endpoint": {"base_url": url},
        "capabilities": {"helpdesk.ticket": {"op": {"method": "POST", "path": "/tickets"}}},
        "timeout_s": timeout_s,
        "retry": {"attempts": 1000, "backoff_s": [0.05, 0.5], "max_age_s": max_age_s},
    }


def test_while_the_peer_is_down_requests_wait_then_are_done_once_and_old_ones_expire(
    settings: OutpostSettings, api: StoreAPI, gateway: list[Any], collect: Any, publisher: Bus
) -> None:
    """The outage here is the peer itself going away (connection refused: it stops listening and
    cuts open connections); test_a_network_cut... cuts the link instead."""
    declare(settings, store=store_connector(api.url), helpdesk=helpdesk_connector(api.url, 1.5))
    g = start_gateway(gateway, settings)
    res = collect(settings.topics.all_action_results)
    dlq = collect(settings.topics.dlq("connectors"))
    send(publisher, settings, request("before"))
    assert res.wait_for(lambda c: "before" in final(c), WAIT)
    api.down()
    keys = [f"out-{i}" for i in range(10)]
    for k in keys:
        send(publisher, settings, request(k, args={"shelf": k, "quantity": 1}))
    send(publisher, settings, request("too-old", "helpdesk.ticket", {"subject": "x"}), "helpdesk")
    assert res.wait_for(lambda c: "too-old" in final(c), WAIT)
    doc = results(res)["too-old"][0]
    assert doc["outcome"] == "expired", doc
    assert dlq.wait_for(lambda c: any(d["reason"] == "expired" for d in c.json()), WAIT)
    assert [d["reason"] for d in dead(dlq)] == ["expired"]
    assert not set(keys) & set(results(res)), "nothing was done while the peer was down"

    def queued(c: Collector) -> bool:  # the gateway's metrics: its connectors' queues
        return any(d["state"]["connectors"]["store"]["queued"] >= len(keys) for d in c.json())

    metrics = collect(settings.topics.metrics("connectors"))
    assert metrics.wait_for(queued, WAIT), "the requests wait in the queue"
    api.up()
    assert res.wait_for(lambda c: set(keys) <= set(final(c)), WAIT), results(res)
    assert {final(res)[k] for k in keys} == {"done"}
    effects = api.effects()
    assert {k: effects[k]["effects"] for k in keys} == dict.fromkeys(keys, 1)
    assert "too-old" not in effects, "an expired request is never tried again"
    gw = g.stop()
    assert gw.metrics.counters["retries.store"] >= 1
    assert max(d["attempts"] for k in keys for d in results(res)[k]) >= 2


def test_requests_queued_at_a_stop_are_done_after_the_restart_with_nothing_new_arriving(
    settings: OutpostSettings, api: StoreAPI, gateway: list[Any], collect: Any, publisher: Bus
) -> None:
    """What the outbox held at a stop is dispatched as soon as the gateway is back, though no new
    request arrives to wake it (the gateway has no tick: its upkeep timer runs once a minute)."""
    declare(settings, store=store_connector(api.url))
    g = start_gateway(gateway, settings)
    res = collect(settings.topics.all_action_results)
    metrics = collect(settings.topics.metrics("connectors"))
    api.down()
    keys = [f"held-{i}" for i in range(5)]
    for k in keys:
        send(publisher, settings, request(k, args={"shelf": k, "quantity": 1}))
    assert metrics.wait_for(
        lambda c: any(d["state"]["connectors"]["store"]["queued"] >= len(keys) for d in c.json()), WAIT
    )
    g.stop()  # drained: the requests stay queued in the outbox
    api.up()
    start_gateway(gateway, settings)
    assert res.wait_for(lambda c: set(keys) <= set(final(c)), 30), results(res)
    assert {final(res)[k] for k in keys} == {"done"}
    effects = api.effects()
    assert {k: effects[k]["effects"] for k in keys} == dict.fromkeys(keys, 1)


class NetnsPeer:
    """The store API as a process in a network namespace of the test's own, reached over a veth
    pair whose link the test takes down and up: a real network cut (packets go nowhere)."""

    def __init__(self, tmp: Path) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns, self.host_if, self.peer_if = f"octest-{tag}", f"oc{tag}a", f"oc{tag}b"
        octet = int(tag[:2], 16) % 250 + 1
        self.net, self.local, self.remote = f"10.213.{octet}.0/30", f"10.213.{octet}.1", f"10.213.{octet}.2"
        self.url = f"http://{self.remote}:18080"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "netns-peer.log"

    @staticmethod
    def available() -> bool:
        ip = shutil.which("ip")
        if ip is None:
            return False
        probe = subprocess.run([ip, "netns", "list"], capture_output=True, check=False)
        return probe.returncode == 0 and sys.platform.startswith("linux")

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def start(self) -> NetnsPeer:
        self._ip("netns", "add", self.ns)
        self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
        self._ip("link", "set", self.peer_if, "netns", self.ns)
        self._ip("addr", "add", f"{self.local}/30", "dev", self.host_if)
        self._ip("link", "set", self.host_if, "up")
        # never elsewhere: with the link down, packets for the peer meet this route, not the default
        self._ip("route", "add", "unreachable", self.net, "metric", "4000")
        self._ip("netns", "exec", self.ns, "ip", "addr", "add", f"{self.remote}/30", "dev", self.peer_if)
        self._ip("netns", "exec", self.ns, "ip", "link", "set", self.peer_if, "up")
        self._ip("netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
        cmd = ["ip", "netns", "exec", self.ns, sys.executable, "-m", "outpost.sim.store_api"]
        self.proc = subprocess.Popen(
            [*cmd, "--host", self.remote, "--port", "18080"],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        assert wait_until(self._answers, 30), self.log.read_text()
        return self

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/_stats", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def get(self, path: str) -> Any:
        return httpx.get(f"{self.url}{path}", timeout=5).json()

    def faults(self, **spec: Any) -> None:
        httpx.post(f"{self.url}/_faults", json=spec, timeout=5).raise_for_status()

    def cut(self) -> None:
        """The peer's end of the link goes down: what the gateway sends is lost on the way."""
        self._ip("netns", "exec", self.ns, "ip", "link", "set", self.peer_if, "down")

    def restore(self) -> None:
        self._ip("netns", "exec", self.ns, "ip", "link", "set", self.peer_if, "up")
        assert wait_until(self._answers, 30), "the link came back but the peer does not answer"

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)
        subprocess.run(
            ["ip", "route", "del", "unreachable", self.net, "metric", "4000"],
            capture_output=True,
            check=False,
        )
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)


@pytest.mark.slow
@pytest.mark.skipif(not NetnsPeer.available(), reason="needs root and ip netns for a real network cut")
def test_a_network_cut_mid_call_loses_nothing_and_doubles_nothing(
    settings: OutpostSettings, gateway: list[Any], collect: Any, publisher: Bus, tmp_path: Path
) -> None:
    """A real cut: the peer runs in a network namespace of the test's own behind a veth pair, and
    the peer's end of the link is taken down (``ip link set ... down``) with calls in flight, then
    brought back. The calls caught by the cut time out (their answers never come back, though the
    peer may have acted), are tried again with the same key once the link is back, and take effect
    once. Without root and ``ip netns`` it is skipped: the outage test (the peer stops listening)
    still covers the endpoint being gone. A request
    that cannot wait that long (``max_age_s``) expires, even when its age runs out during a call."""
    peer = NetnsPeer(tmp_path).start()
    try:
        declare(
            settings,
            store=store_connector(peer.url, timeout_s=1),
            helpdesk=helpdesk_connector(peer.url, 1.5, timeout_s=1),
        )
        g = start_gateway(gateway, settings)
        res = collect(settings.topics.all_action_results)
        dlq = collect(settings.topics.dlq("connectors"))
        peer.faults(slow_ms=400)
        keys = [f"cut-{i}" for i in range(12)]
        for k in keys[:6]:
            send(publisher, settings, request(k, args={"shelf": k, "quantity": 1}))
        assert wait_until(lambda: len(peer.get("/_arrivals")) >= 2, WAIT)
        peer.cut()
        try:
            for k in keys[6:]:
                send(publisher, settings, request(k, args={"shelf": k, "quantity": 1}))
            send(publisher, settings, request("cut-old", "helpdesk.ticket", {"subject": "x"}), "helpdesk")
            assert res.wait_for(lambda c: "cut-old" in final(c), WAIT)
            assert not set(keys[6:]) & set(results(res)), "nothing sent during the cut was done"
            time.sleep(1.5)  # calls caught by the cut time out (timeout_s 1) and wait to be tried again
        finally:
            peer.restore()
        assert res.wait_for(lambda c: set(keys) <= set(final(c)), WAIT), results(res)
        assert set(final(res)[k] for k in keys) <= {"done", "duplicate"}, [
            (d["key"], d["outcome"], d["detail"], d["attempts"], d["result"]) for d in res.json()
        ]
        effects = peer.get("/_effects")
        assert {k: effects[k]["effects"] for k in keys} == dict.fromkeys(keys, 1)
        assert "cut-old" not in effects
        assert any(e["requests"] >= 2 for e in effects.values()), "calls caught by the cut were tried again"
        assert final(res)["cut-old"] == "expired", [
            (d["detail"], d["attempts"]) for d in results(res)["cut-old"]
        ]
        assert dlq.wait_for(lambda c: any(d["reason"] == "expired" for d in c.json()), WAIT)
        assert [d["reason"] for d in dead(dlq)] == ["expired"]
        gw = g.stop()
        assert gw.metrics.counters["retries.store"] >= 1
    finally:
        peer.close()


# --- kill -9 ---------------------------------------------------------------------------------------
def gateway_process(settings: OutpostSettings, workdir: Path, **connectors: dict[str, Any]) -> ServiceProcess:
    env = {
        "OUTPOST_SITE": settings.site,
        "OUTPOST_DATA_DIR": str(settings.data_dir),
        "OUTPOST_MQTT__PORT": str(settings.mqtt.port),
        "OUTPOST_TELEMETRY__METRICS_INTERVAL_S": "0.5",
        "OUTPOST_LOG_LEVEL": "DEBUG",
        "OUTPOST_CONNECTORS__DECLARED": json.dumps(connectors),
    }
    return ServiceProcess("outpost.services.connectors", "connectors", env, workdir)


@pytest.mark.slow
def test_kill_9_mid_call_then_restart_has_each_effect_once_and_one_outcome_per_request(
    settings: OutpostSettings, api: StoreAPI, broker: Mosquitto, collect: Any, publisher: Bus, tmp_path: Path
) -> None:
    proc = gateway_process(settings, tmp_path / "run", store=store_connector(api.url, concurrency=4))
    try:
        res = collect(settings.topics.all_action_results)
        pid = proc.start().pid
        wait_status(settings, "connectors", pid=pid)
        api.faults(slow_ms=1500)  # calls are mid-way when the gateway dies
        keys = [f"k9-{i}" for i in range(16)]
        for k in keys[:12]:
            send(publisher, settings, request(k, args={"shelf": k, "quantity": 1}))
        assert wait_until(lambda: len(api.arrivals()) >= 4, WAIT), proc.logs()
        proc.kill()
        inflight = {a["key"] for a in api.arrivals()}
        for k in keys[12:]:  # sent while the gateway is dead: the broker keeps them for it
            send(publisher, settings, request(k, args={"shelf": k, "quantity": 1}))
        api.faults(slow_ms=50)
        pid = proc.start().pid
        wait_status(settings, "connectors", pid=pid)
        assert res.wait_for(lambda c: set(keys) <= set(final(c)), WAIT), (results(res), proc.logs())
        outcomes = final(res)
        assert set(outcomes[k] for k in keys) <= {"done", "duplicate"}, outcomes
        effects = api.effects()
        assert {k: effects[k]["effects"] for k in keys} == dict.fromkeys(keys, 1)
        assert set(effects) == set(keys)
        # the calls the kill caught were sent again after the restart and the peer replayed them
        # (duplicate); one that had come back before the kill (a very slow machine) was not
        caught = {k for k in inflight if effects[k]["requests"] == 2}
        assert caught, "the kill caught no call mid-way"
        assert all(outcomes[k] == "duplicate" for k in caught), {k: outcomes[k] for k in caught}
        assert all(effects[k]["requests"] == 1 for k in set(keys) - caught)
        assert all(outcomes[k] == "done" for k in set(keys) - caught)
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.close()


# --- secrets ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_no_secret_appears_anywhere_the_gateway_writes(
    settings: OutpostSettings, broker: Mosquitto, collect: Any, publisher: Bus, tmp_path: Path
) -> None:
    """The OAuth2 client secret, a bearer token from the secret store and every access token the
    peer issued: none of their bytes in any MQTT message on the broker (results, dead letters,
    metrics, status), the gateway's log output (DEBUG), or any file in the data folder (outbox.db and
    its WAL), though the peer echoes the request's headers in every error answer."""
    client_secret = "cs-" + uuid.uuid4().hex
    bearer = "bt-" + uuid.uuid4().hex
    api = StoreAPI(auth=True, client_secret=client_secret).start()
    proc: ServiceProcess | None = None
    try:
        store = SecretStore(site_path(settings.data_dir, settings.site, "connectors"))
        store.set("store-client", client_secret)
        store.set("helpdesk-token", bearer)
        oauth = {
            "kind": "oauth2",
            "token_url": f"{api.url}/oauth/token",
            "client_id": "outpost",
            "client_secret": {"secret": "store-client"},
        }
        helpdesk = helpdesk_connector(api.url, 60)
        helpdesk["endpoint"] = {
            "base_url": api.url,
            "auth": {"kind": "bearer", "token": {"secret": "helpdesk-token"}},
        }
        helpdesk["retry"] = {"attempts": 2, "backoff_s": [0.05, 0.1], "max_age_s": 60}
        everything = collect("#")
        proc = gateway_process(
            settings,
            tmp_path / "run",
            store=store_connector(api.url, endpoint={"base_url": api.url, "auth": oauth}),
            helpdesk=helpdesk,
        )
        pid = proc.start().pid
        wait_status(settings, "connectors", pid=pid)
        res = collect(settings.topics.all_action_results)
        api.faults(echo_headers=True)
        send(publisher, settings, request("s-ok"))
        assert res.wait_for(lambda c: "s-ok" in final(c), WAIT)
        api.faults(fail_next=2)
        send(publisher, settings, request("s-retried"))
        assert res.wait_for(lambda c: "s-retried" in final(c), WAIT)
        api.faults(status=400, count=1)
        send(publisher, settings, request("s-400"))
        assert res.wait_for(lambda c: "s-400" in final(c), WAIT)
        api.faults(revoke_tokens=True)
        send(publisher, settings, request("s-revoked"))
        send(publisher, settings, request("s-bearer", "helpdesk.ticket", {"subject": "x"}), "helpdesk")
        send(publisher, settings, request("s-bad", args={"shelf": 1}))
        want = {"s-ok", "s-retried", "s-400", "s-revoked", "s-bearer", "s-bad"}
        assert res.wait_for(lambda c: want <= set(final(c)), WAIT), (results(res), proc.logs())
        got = final(res)
        assert got["s-ok"] == got["s-retried"] == got["s-revoked"] == "done", got
        assert got["s-400"] == got["s-bearer"] == "failed" and got["s-bad"] == "refused", got
        assert any("headers" in str(d["result"]) for d in results(res)["s-400"]), "the bait was taken"
        time.sleep(1.5)  # a metrics interval or two, so counters and status are on the bus too
        assert proc.terminate() == 0
        issued = api.issued()
        assert len(issued) >= 2
        needles = {
            "client secret": client_secret.encode(),
            "client credentials (Basic)": base64.b64encode(f"outpost:{client_secret}".encode()),
            "bearer secret": bearer.encode(),
            **{f"access token {i}": t.encode() for i, t in enumerate(issued)},
        }
        haystacks: dict[str, bytes] = {}
        for i, (topic, payload) in enumerate(everything.messages):
            haystacks[f"mqtt {topic} #{i}"] = topic.encode() + b"\n" + payload
            if "/dlq/" in topic:
                haystacks[f"mqtt {topic} #{i} payload_b64"] = base64.b64decode(
                    orjson.loads(payload)["payload_b64"]
                )
        assert any("/metrics/connectors" in t for t, _ in everything.messages)
        haystacks["log"] = "".join(p.read_text() for p in (tmp_path / "run").glob("*.log")).encode()
        for f in Path(settings.data_dir).rglob("*"):
            if f.is_file():
                haystacks[str(f)] = f.read_bytes()
        assert any(name.endswith("outbox.db") for name in haystacks)
        leaks = [(what, where) for what, n in needles.items() for where, h in haystacks.items() if n in h]
        assert not leaks, "\n".join(f"{what} in {where}" for what, where in leaks)
    finally:
        if proc is not None:
            proc.close()
        api.stop()


def test_keys_no_header_can_carry_as_they_are_still_take_effect_once_each(
    settings: OutpostSettings, api: StoreAPI, gateway: list[Any], collect: Any, publisher: Bus
) -> None:
    """An idempotency key is any string up to 128 characters (the contract): one that is not a
    valid HTTP header value as it is (not ASCII, a line break, spaces at its ends) must still
    reach the peer as a key of its own, not stall the connector in retries."""
    declare(settings, store=store_connector(api.url, retry={"attempts": 5, "backoff_s": [0.05, 0.2]}))
    start_gateway(gateway, settings)
    res = collect(settings.topics.all_action_results)
    keys = ["ключ-1", "line\nbreak", " padded ", "tab\there", "percent%41", "percentA", "plain-1"]
    for k in keys:
        send(publisher, settings, request(k))
        send(publisher, settings, request(k))
    assert res.wait_for(lambda c: set(keys) <= set(final(c)), WAIT), results(res)
    assert {k: final(res)[k] for k in keys} == dict.fromkeys(keys, "done"), [
        (d["key"], d["outcome"], d["detail"]) for d in res.json()
    ]
    effects = api.effects()
    assert len(effects) == len(keys), effects.keys()
    assert all(e["effects"] == 1 for e in effects.values())


def test_a_retry_after_longer_than_a_requests_age_does_not_hold_it_past_its_age(
    settings: OutpostSettings, api: StoreAPI, gateway: list[Any], collect: Any, publisher: Bus
) -> None:
    """A peer may say come back in an hour; a request that may wait 2 s expires then (result
    expired, dead letter expired), and the connector is not held for the hour."""
    retry = {"attempts": 50, "backoff_s": [0.05, 0.5], "max_age_s": 2}
    declare(settings, store=store_connector(api.url, retry=retry))
    start_gateway(gateway, settings)
    res = collect(settings.topics.all_action_results)
    dlq = collect(settings.topics.dlq("connectors"))
    api.faults(status=429, retry_after=3600, count=1)
    send(publisher, settings, request("hour"))
    assert res.wait_for(lambda c: "hour" in final(c), 30), "held past its age"
    assert final(res)["hour"] == "expired", results(res)["hour"]
    assert dlq.wait_for(lambda c: [d["reason"] for d in c.json()] == ["expired"], WAIT), dlq.json()
    send(publisher, settings, request("after"))
    assert res.wait_for(lambda c: "after" in final(c), 30)
    assert final(res)["after"] == "done"
    assert "hour" not in api.effects()


def test_a_token_shorter_lived_than_refresh_before_s_is_still_cached(
    settings: OutpostSettings, gateway: list[Any], collect: Any, publisher: Bus
) -> None:
    """Tokens that live 4 s, under the default refresh_before_s (30 s): reused for a while, not
    fetched again for every call, and still refreshed before they expire."""
    api = StoreAPI(auth=True, client_secret="short-lived-secret", token_ttl_s=4).start()
    try:
        SecretStore(site_path(settings.data_dir, settings.site, "connectors")).set(
            "store-client", "short-lived-secret"
        )
        auth = {
            "kind": "oauth2",
            "token_url": f"{api.url}/oauth/token",
            "client_id": "outpost",
            "client_secret": {"secret": "store-client"},
        }
        declare(settings, store=store_connector(api.url, endpoint={"base_url": api.url, "auth": auth}))
        start_gateway(gateway, settings)
        res = collect(settings.topics.all_action_results)
        for i in range(10):
            send(publisher, settings, request(f"short-{i}"))
        assert res.wait_for(lambda c: len(final(c)) == 10, WAIT)
        assert api.stats()["token_fetches"] <= 2, api.stats()
        for i in range(10, 20):
            send(publisher, settings, request(f"short-{i}"))
            time.sleep(0.5)
        assert res.wait_for(lambda c: len(final(c)) == 20, WAIT)
        s = api.stats()
        assert s["unauthorized"] == 0 and 2 <= s["token_fetches"] <= 10, s
        assert set(final(res).values()) == {"done"}
    finally:
        api.stop()


def test_a_failing_peer_is_probed_by_one_call_at_a_time_not_by_every_lane_slot(
    settings: OutpostSettings, api: StoreAPI, gateway: list[Any], collect: Any, publisher: Bus
) -> None:
    """While the peer fails (500, slowly), the connector tries one request at a time rather than
    ``concurrency`` of them each round; once one succeeds, it goes at full width again."""
    retry = {"attempts": 1000, "backoff_s": [0.05, 0.1], "max_age_s": 120}
    declare(settings, store=store_connector(api.url, concurrency=8, retry=retry))
    start_gateway(gateway, settings)
    res = collect(settings.topics.all_action_results)
    api.faults(fail_next=10**6, slow_ms=100)
    keys = [f"p-{i}" for i in range(40)]
    for k in keys:
        send(publisher, settings, request(k, args={"shelf": k, "quantity": 1}))
    assert wait_until(lambda: len(api.arrivals()) >= 40, WAIT)
    api.faults(fail_next=0)
    assert res.wait_for(lambda c: set(keys) <= set(final(c)), WAIT)
    failing = [a for a in api.arrivals() if a["status"] == 500]
    overlapped = [a for a in failing if a["concurrent"] > 1]
    # only the first round (up to 8 calls sent before any failure came back) overlaps
    assert len(overlapped) <= 8, f"{len(overlapped)} of {len(failing)} failing calls overlapped"
    assert {final(res)[k] for k in keys} == {"done"}
    assert all(e["effects"] == 1 for e in api.effects().values())
