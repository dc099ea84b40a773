"""Every topic Outpost uses, defined once.

Topics are versioned and site-scoped: ``{prefix}/v1/{site}/...``. Each level has one meaning, so a
wildcard can filter on any level. Identifiers that come from input (site, device, service, ...) must
match ``[A-Za-z0-9_-]{1,64}``; anything else is refused here and never escaped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from outpost.errors import TopicError

VERSION = "v1"
MAX_SEGMENT = 64
SEGMENT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_segment(value: str, what: str = "identifier") -> str:
    """Return ``value`` if it is a valid topic segment, else raise TopicError saying why."""
    if not isinstance(value, str):
        raise TopicError(f"{what} must be a string, got {type(value).__name__}", segment=None)
    if SEGMENT_RE.fullmatch(value) is None:
        shown = value if len(value) <= MAX_SEGMENT else value[:MAX_SEGMENT] + "..."
        if len(value) > MAX_SEGMENT:
            reason = f"longer than {MAX_SEGMENT} characters"
        elif not value:
            reason = "empty"
        else:
            reason = "only A-Z a-z 0-9 _ - are allowed"
        raise TopicError(f"invalid {what} {shown!r}: {reason}", segment=shown)
    return value


def is_segment(value: str) -> bool:
    return SEGMENT_RE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic builders and subscription patterns for one installation (prefix) and one site."""

    site: str
    prefix: str = "outpost"

    def __post_init__(self) -> None:
        check_segment(self.prefix, "prefix")
        check_segment(self.site, "site")

    @property
    def root(self) -> str:
        return f"{self.prefix}/{VERSION}/{self.site}"

    # --- devices ---------------------------------------------------------------------------------
    def telemetry(self, device: str) -> str:
        return f"{self.root}/dev/{check_segment(device, 'device')}/telemetry"

    def device_status(self, device: str) -> str:
        return f"{self.root}/dev/{check_segment(device, 'device')}/status"

    def device_cmd(self, device: str, name: str) -> str:
        return f"{self.root}/dev/{check_segment(device, 'device')}/cmd/{check_segment(name, 'command')}"

    @property
    def all_telemetry(self) -> str:
        return f"{self.root}/dev/+/telemetry"

    @property
    def all_device_status(self) -> str:
        return f"{self.root}/dev/+/status"

    def device_of(self, topic: str) -> str:
        """The device id of a ``.../dev/{device}/...`` topic; TopicError if the topic is not one or
        the device segment is invalid."""
        root = self.root + "/dev/"
        if not topic.startswith(root):
            raise TopicError(f"not a device topic of site {self.site!r}: {topic[:200]!r}")
        rest = topic[len(root) :]
        device, sep, _ = rest.partition("/")
        if not sep:
            raise TopicError(f"device topic has no kind level: {topic[:200]!r}")
        return check_segment(device, "device")

    # --- services --------------------------------------------------------------------------------
    def events(self, device: str) -> str:
        return f"{self.root}/events/{check_segment(device, 'device')}"

    @property
    def all_events(self) -> str:
        return f"{self.root}/events/+"

    def dlq(self, stage: str) -> str:
        return f"{self.root}/dlq/{check_segment(stage, 'stage')}"

    @property
    def all_dlq(self) -> str:
        return f"{self.root}/dlq/+"

    def inference(self, model: str, device: str) -> str:
        return f"{self.root}/inference/{check_segment(model, 'model')}/{check_segment(device, 'device')}"

    @property
    def all_inference(self) -> str:
        return f"{self.root}/inference/+/+"

    def memory_request(self, op: str) -> str:
        """Requests to the memory service (MQTT 5: the answer goes to the response topic)."""
        return f"{self.root}/memory/req/{check_segment(op, 'operation')}"

    @property
    def all_memory_requests(self) -> str:
        return f"{self.root}/memory/req/+"

    def memory_response(self, client: str) -> str:
        """Where a memory client wants its answers (it says so in each request)."""
        return f"{self.root}/memory/resp/{check_segment(client, 'client')}"

    # --- uplink: what crosses to and from the cloud (the edge broker's bridge carries up/ and down/)
    def up(self, part: str, stream: str) -> str:
        """What a part of the site sends to the cloud (memory sync: ``up/memory/{stream}``)."""
        return f"{self.root}/up/{check_segment(part, 'part')}/{check_segment(stream, 'stream')}"

    def down(self, part: str, name: str) -> str:
        """What the cloud sends to a part of the site (memory sync: ``down/memory/ack``)."""
        return f"{self.root}/down/{check_segment(part, 'part')}/{check_segment(name, 'name')}"

    @property
    def all_up(self) -> str:
        return f"{self.root}/up/#"

    @property
    def all_down(self) -> str:
        return f"{self.root}/down/#"

    def every_site_up(self, part: str) -> str:
        """The cloud's view: ``up/{part}/+`` of every site of this installation."""
        return f"{self.prefix}/{VERSION}/+/up/{check_segment(part, 'part')}/+"

    def uplink_state(self) -> str:
        """Where Mosquitto reports its bridge to the cloud up (``1``) or down (``0``), retained: the
        bridge's client id is ``{prefix}-{site}-uplink`` (:mod:`outpost.broker`)."""
        return f"$SYS/broker/connection/{self.prefix}-{self.site}-uplink/state"

    def decisions(self, agent: str) -> str:
        return f"{self.root}/decisions/{check_segment(agent, 'agent')}"

    def actions(self, connector: str) -> str:
        return f"{self.root}/actions/{check_segment(connector, 'connector')}"

    def metrics(self, service: str) -> str:
        return f"{self.root}/metrics/{check_segment(service, 'service')}"

    @property
    def all_metrics(self) -> str:
        return f"{self.root}/metrics/+"

    def service_status(self, service: str) -> str:
        return f"{self.root}/svc/{check_segment(service, 'service')}/status"

    @property
    def all_service_status(self) -> str:
        return f"{self.root}/svc/+/status"

    def control(self, service: str, kind: str) -> str:
        if kind not in ("desired", "reported"):
            raise TopicError(f"control kind must be desired or reported, got {kind!r}")
        return f"{self.root}/control/{check_segment(service, 'service')}/{kind}"


def shared(group: str, pattern: str) -> str:
    """A shared-subscription filter: the broker spreads matching messages over the group's members."""
    return f"$share/{check_segment(group, 'share group')}/{pattern}"
