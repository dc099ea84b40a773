"""Watch a site from the outside, as an operator would: events, dead letters, service status and
metrics, and what the agents report, all from the broker. Used by ``outpost demo`` and ``outpost
status``."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any

import orjson

from outpost.bus import Bus, Message
from outpost.metrics import Histogram
from outpost.settings import MqttSettings
from outpost.topics import Topics


class SiteMonitor:
    def __init__(
        self, mqtt: MqttSettings, topics: Topics, *, client_id: str, watch_events: bool = True
    ) -> None:
        self.topics = topics
        self.lock = threading.Lock()
        self.events = 0
        self.event_ids: set[str] = set()
        self.duplicates = 0
        self.latency = Histogram()
        self.by_metric: Counter[str] = Counter()
        self.anomalies = 0
        self.dlq: Counter[str] = Counter()
        self.scores = 0
        self.score_ids: set[str] = set()
        self.scores_by_model: Counter[str] = Counter()
        self.alerts: Counter[str] = Counter()
        self.labels: Counter[str] = Counter()
        self.score_latency = Histogram()
        self.status: dict[str, dict[str, Any]] = {}
        self.metrics: dict[str, dict[str, Any]] = {}
        self.previous_metrics: dict[str, tuple[float, dict[str, Any]]] = {}
        """Per service, the snapshot before the latest and when it arrived (monotonic s)."""
        self.metrics_at: dict[str, float] = {}
        self.devices_online: dict[str, bool] = {}
        self.agents: dict[str, dict[str, Any]] = {}
        """Each agent's figures, as the agent service last reported them (control/agents/reported)."""
        self._window: deque[tuple[float, int]] = deque(maxlen=64)
        self.bus = Bus(mqtt, client_id=client_id)
        if watch_events:
            self.bus.subscribe(topics.all_events, self._on_events, qos=1)
            self.bus.subscribe(topics.all_dlq, self._on_dlq, qos=1)
            self.bus.subscribe(topics.all_device_status, self._on_device_status, qos=1)
            self.bus.subscribe(topics.all_inference, self._on_scores, qos=1)
        self.bus.subscribe(topics.all_service_status, self._on_status, qos=1)
        self.bus.subscribe(topics.all_metrics, self._on_metrics, qos=0)
        self.bus.subscribe(topics.control("agents", "reported"), self._on_agents, qos=1)
        self.bus.every(0.5, self._sample)

    def start(self, wait_s: float = 10.0) -> SiteMonitor:
        self.bus.start(wait_s=wait_s)
        return self

    def stop(self) -> None:
        self.bus.stop(drain_s=0)

    def _on_events(self, msg: Message) -> None:
        now = time.time_ns()
        with self.lock:
            for ev in _objects(msg.payload):
                eid: Any = ev.get("id")
                if eid in self.event_ids:
                    self.duplicates += 1
                    continue
                self.event_ids.add(eid)
                self.events += 1
                self.by_metric[ev.get("metric", "?")] += 1
                ts = ev.get("ts")
                if isinstance(ts, int):
                    self.latency.record_ns(now - ts)

    def _on_scores(self, msg: Message) -> None:
        now = time.time_ns()
        with self.lock:
            for sc in _objects(msg.payload):
                sid = sc.get("id")
                if not isinstance(sid, str) or sid in self.score_ids:
                    continue
                self.score_ids.add(sid)
                self.scores += 1
                model = f"{sc.get('model')}@{sc.get('version')}"
                self.scores_by_model[model] += 1
                self.labels[f"{sc.get('model')}: {sc.get('label')}"] += 1
                if sc.get("alert"):
                    self.alerts[str(sc.get("model"))] += 1
                ts = sc.get("ts")
                if isinstance(ts, int):
                    self.score_latency.record_ns(now - ts)

    def _on_dlq(self, msg: Message) -> None:
        count = 1
        try:
            doc = orjson.loads(msg.payload)
            reason = doc.get("reason", "?")
            # a grouped or aggregated dead letter stands for `count` inputs (docs/topics.md)
            count = doc.get("count", 1) if isinstance(doc.get("count", 1), int) else 1
        except (orjson.JSONDecodeError, AttributeError):
            reason = "?"
        with self.lock:
            self.dlq[str(reason)] += max(1, count)

    def _on_device_status(self, msg: Message) -> None:
        device = msg.topic.split("/")[-2]
        try:
            doc = orjson.loads(msg.payload)
            online = isinstance(doc, dict) and doc.get("state") == "online"
        except orjson.JSONDecodeError:
            online = msg.payload == b"online"
        with self.lock:
            self.devices_online[device] = online

    def _on_status(self, msg: Message) -> None:
        if not msg.payload:
            return
        try:
            doc = orjson.loads(msg.payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        with self.lock:
            self.status[str(doc.get("service", msg.topic.split("/")[-2]))] = doc

    def _on_metrics(self, msg: Message) -> None:
        try:
            doc = orjson.loads(msg.payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        name = str(doc.get("service", msg.topic.split("/")[-1]))
        now = time.monotonic()
        with self.lock:
            if name in self.metrics:
                self.previous_metrics[name] = (self.metrics_at[name], self.metrics[name])
            self.metrics[name], self.metrics_at[name] = doc, now

    def _on_agents(self, msg: Message) -> None:
        try:
            doc = orjson.loads(msg.payload) if msg.payload else {}
        except orjson.JSONDecodeError:
            return
        agents = doc.get("agents") if isinstance(doc, dict) else None
        if isinstance(agents, dict):
            with self.lock:
                self.agents = {str(k): v for k, v in agents.items() if isinstance(v, dict)}

    def agents_summary(self) -> dict[str, dict[str, Any]]:
        """Per agent: its state, decisions, escalations (and how many are open), actions and the
        human override rate (None until a person answered one), as last reported."""
        with self.lock:
            return self._agents_summary()

    def _agents_summary(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "state": a.get("state"),
                "decisions": a.get("decisions", 0),
                "escalations": a.get("escalated", 0),
                "escalations_open": a.get("escalations_open", 0),
                "actions": a.get("acted", 0),
                "override_rate": a.get("override_rate"),
            }
            for name, a in sorted(self.agents.items())
        }

    def actions_summary(self) -> dict[str, dict[str, Any]]:
        """Per connector: its requests' outcomes (done, duplicate, failed, expired, refused) and the
        cost of its calls, from the gateway's metrics (``results.{connector}.{outcome}``)."""
        with self.lock:
            return self._actions_summary()

    def _actions_summary(self) -> dict[str, dict[str, Any]]:
        counters = self.metrics.get("connectors", {}).get("counters", {})
        out: dict[str, dict[str, Any]] = {}
        for name, n in counters.items():
            kind, _, rest = str(name).partition(".")
            if kind == "results":
                connector, _, outcome = rest.rpartition(".")
                out.setdefault(connector, {"outcomes": {}, "cost": 0.0})["outcomes"][outcome] = int(n)
            elif kind == "cost_millis":
                out.setdefault(rest, {"outcomes": {}, "cost": 0.0})["cost"] = int(n) / 1000.0
        return dict(sorted(out.items()))

    def message_rate(self, service: str) -> float | None:
        """Messages per second a service took between its last two metrics snapshots; None before
        it has published two."""
        with self.lock:
            if service not in self.previous_metrics:
                return None
            t0, before = self.previous_metrics[service]
            t1, after = self.metrics_at[service], self.metrics[service]
        n0 = int(before.get("counters", {}).get("messages", 0))
        n1 = int(after.get("counters", {}).get("messages", 0))
        return max(0, n1 - n0) / (t1 - t0) if t1 > t0 else None

    def _sample(self) -> None:
        with self.lock:
            self._window.append((time.monotonic(), self.events))

    def rate(self, span_s: float = 5.0) -> float:
        """Events per second over about the last ``span_s`` seconds."""
        with self.lock:
            if len(self._window) < 2:
                return 0.0
            t1, n1 = self._window[-1]
            for t0, n0 in self._window:
                if t1 - t0 <= span_s:
                    return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
            return 0.0

    def summary(self) -> dict[str, Any]:
        with self.lock:
            ingest = self.metrics.get("ingest", {}).get("counters", {})
            return {
                "validated": self.events,
                "duplicates_dropped_by_consumer": self.duplicates,
                "rejected": sum(self.dlq.values()),
                "rejected_by_reason": dict(self.dlq.most_common()),
                "latency_ms": {"p50": self.latency.percentile_ms(50), "p99": self.latency.percentile_ms(99)},
                "by_metric": dict(self.by_metric.most_common()),
                "devices_online": sum(1 for v in self.devices_online.values() if v),
                "devices_seen": len(self.devices_online),
                "ingest_counters": ingest,
                "memory_counters": self.metrics.get("memory", {}).get("counters", {}),
                "uplink_counters": self.metrics.get("uplink", {}).get("counters", {}),
                "uplink_state": self.metrics.get("uplink", {}).get("state", {}),
                "scores": self.scores,
                "scores_by_model": dict(self.scores_by_model.most_common()),
                "score_labels": dict(sorted(self.labels.items())),
                "alerts": dict(self.alerts.most_common()),
                "score_latency_ms": {
                    "p50": self.score_latency.percentile_ms(50),
                    "p99": self.score_latency.percentile_ms(99),
                },
                "services": {k: v.get("state") for k, v in self.status.items()},
                "agents": self._agents_summary(),
                "actions": self._actions_summary(),
            }


def _objects(payload: bytes | bytearray) -> list[dict[str, Any]]:
    """The JSON objects of a message that holds one or a list of them (events, scores); nothing
    for one that is not JSON: the monitor watches, the services dead-letter."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return []
    return [d for d in (doc if isinstance(doc, list) else [doc]) if isinstance(d, dict)]
