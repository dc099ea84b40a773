"""The caller's side of the memory request API over MQTT 5: a request carries a response topic and
correlation data; the answer comes back on that topic with the same correlation data.

    with MemoryClient(settings, "agent-1") as mem:
        mem.request("context-put", {"scope": "task-7", "key": "step", "value": 3})
        mem.request("checkpoint-save", {"task": "task-7", "step": "fetch", "state": {...}, "expect": 0})

A refused request raises :class:`MemoryRequestError` with the service's reason; no answer within
the timeout raises :class:`MemoryTimeout` (the request may still have been carried out: retry
with ``expect`` on checkpoints to stay exactly-once in effect).
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from outpost.bus import Bus, Message
from outpost.errors import OutpostError
from outpost.services.registry import OutpostSettings


class MemoryRequestError(OutpostError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class MemoryTimeout(OutpostError):  # noqa: N818 (the outcome a caller handles, like TimeoutError)
    """No answer from the memory service in time."""


class MemoryClient:
    def __init__(self, settings: OutpostSettings, client: str) -> None:
        self.topics = settings.topics
        self.response_topic = self.topics.memory_response(client)
        self.bus = Bus(settings.mqtt, client_id=f"{settings.prefix}-{settings.site}-memclient-{client}")
        self._waiting: dict[bytes, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        self.bus.subscribe(self.response_topic, self._on_answer, qos=1)

    def __enter__(self) -> MemoryClient:
        self.bus.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.bus.stop(drain_s=1)

    def _on_answer(self, msg: Message) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None)
        if corr is None:
            return
        with self._lock:
            waiting = self._waiting.get(bytes(corr))
        if waiting is None:
            return  # an answer that came after its timeout
        try:
            doc = orjson.loads(msg.payload)
        except orjson.JSONDecodeError:
            doc = {"ok": False, "error": "bad_answer", "detail": "the answer is not JSON"}
        waiting[1].append(
            doc if isinstance(doc, dict) else {"ok": False, "error": "bad_answer", "detail": ""}
        )
        waiting[0].set()

    def request(self, op: str, body: dict[str, Any], *, timeout_s: float = 5.0) -> Any:
        corr = uuid.uuid4().bytes
        done = threading.Event()
        box: list[dict[str, Any]] = []
        with self._lock:
            self._waiting[corr] = (done, box)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.response_topic
        props.CorrelationData = corr
        try:
            self.bus.publish(self.topics.memory_request(op), orjson.dumps(body), qos=1, properties=props)
            if not done.wait(timeout_s):
                raise MemoryTimeout(f"no answer to {op} within {timeout_s}s (is the memory service running?)")
        finally:
            with self._lock:
                self._waiting.pop(corr, None)
        answer = box[0]
        if not answer.get("ok"):
            raise MemoryRequestError(str(answer.get("error")), str(answer.get("detail", "")))
        return answer.get("result")
