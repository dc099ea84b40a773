"""``kind: mqtt``: a command to a device, on the site's own broker.

Each request is one QoS 1 message on ``outpost/v1/{site}/dev/{device}/cmd/{command}``: the device
comes from the request's args (``device``, or the field ``op.device_field`` names), the command
from the operation. The payload is JSON ``{v, id, ts, trace, key, args}``; the call returns once
the broker has acknowledged it (PUBACK), so ``done`` means the broker holds it for the device's
session.

Not idempotent: MQTT does not deduplicate, so a request caught mid-call, or whose PUBACK did not
come in time, is published again. It carries the request's ``key`` (and the same ``id``), so a
device drops the copy by key: devices keep the keys of the commands they carried out lately.

The connector has an MQTT connection of its own (not the gateway's, whose acknowledgements follow
the outbox), to the broker in the site's ``mqtt`` settings. While it is not connected, or the PUBACK
does not come within the connector's timeout, the request is tried again later.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import orjson
from pydantic import Field

from outpost.bus import Bus
from outpost.contracts import derived_id, header, new_id
from outpost.services.connectors.kinds.base import Context, Kind, Outcome, Request, Strict
from outpost.topics import Topics, is_segment


class Endpoint(Strict):
    """Nothing to set: the connector publishes on the site's broker (the ``mqtt`` settings)."""

    retain: bool = Field(False, description="Retain the command (a device that connects later gets it).")


class Op(Strict):
    command: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="The topic's cmd/{command} level.")
    device_field: str = Field(
        "device", min_length=1, max_length=64, description="The args field naming the device."
    )


class MqttClient:
    def __init__(self, endpoint: Endpoint, timeout_s: float, ctx: Context) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.topics: Topics = ctx.settings.topics
        self.bus = Bus(ctx.settings.mqtt, client_id=f"{ctx.settings.site}-connectors-cmd-{new_id()[:8]}")
        self._acked = threading.Condition()
        self.bus.add_publish_listener(self._on_ack)
        self.bus.start(wait_s=None)  # connects in the background: a call before it is tried again

    def _on_ack(self, _mid: int) -> None:
        with self._acked:
            self._acked.notify_all()

    def call(self, op: Op, requests: Sequence[Request]) -> list[Outcome]:
        return [self._one(op, r) for r in requests]

    def _one(self, op: Op, req: Request) -> Outcome:
        device = req.args.get(op.device_field)
        if not isinstance(device, str) or not is_segment(device):
            return Outcome(False, f"args.{op.device_field} is not a device id: {device!r}"[:300])
        if not self.bus.wait_connected(self.timeout_s):
            return Outcome(False, "not connected to the broker", retry=True)
        topic = self.topics.device_cmd(device, op.command)
        payload = orjson.dumps(
            {**header(req.trace, id=derived_id(req.key, "cmd")), "key": req.key, "args": req.args}
        )
        mid = self.bus.publish(topic, payload, qos=1, retain=self.endpoint.retain)
        deadline = time.monotonic() + self.timeout_s
        with self._acked:
            while self.bus.is_pending(mid):
                left = deadline - time.monotonic()
                if left <= 0:
                    return Outcome(False, f"no PUBACK within {self.timeout_s:g}s", retry=True)
                self._acked.wait(min(left, 0.5))
        return Outcome(True, "acknowledged by the broker", {"topic": topic})

    def close(self) -> None:
        self.bus.stop(drain_s=min(self.timeout_s, 2.0))


def _open(endpoint: Endpoint, timeout_s: float, ctx: Context) -> MqttClient:
    return MqttClient(endpoint, timeout_s, ctx)


KIND = Kind("mqtt", Endpoint, Op, idempotent=False, open=_open)
