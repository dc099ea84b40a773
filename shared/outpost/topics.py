"""Every topic Outpost uses, defined once: builders, subscription patterns and parsers side by side.

Topics are versioned and site-scoped: ``{prefix}/v1/{site}/...``. Each level has one meaning, so a
wildcard can filter on any level. Identifiers that come from input (site, device, service, ...) must
match ``[A-Za-z0-9_-]{1,64}``; anything else is refused here and never escaped.

The parsers (``event_device``, ``score_of``, ...) take a topic a message arrived on and return its
identifiers, or raise :class:`TopicError` saying why the topic is not one of theirs (another site,
a missing or extra level, an identifier that is not a segment: a wildcard, NUL, 65 characters).
They run on hot paths: a ``startswith`` against a head built once, a slice and the segment check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

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


_CLASS_RE = re.compile(r"(.*[^0-9_-])[-_]?[0-9]+")


def device_class(device: str) -> str:
    """The class of a device, for figures per kind of device (readings/s per class, raw readings
    opted in per class): its id without the trailing number (``fridge-007`` -> ``fridge``, the
    simulator's and most fleets' naming); an id with no trailing number is its own class."""
    m = _CLASS_RE.fullmatch(device)
    return m.group(1) if m else device


def is_segment(value: str) -> bool:
    return SEGMENT_RE.fullmatch(value) is not None


def _shown(topic: str) -> str:
    return repr(topic[:200] + ("..." if len(topic) > 200 else ""))


def _level(value: str, what: str, topic: str) -> str:
    """``value``, one level of ``topic``, if it is a valid segment; else TopicError naming the topic."""
    if SEGMENT_RE.fullmatch(value) is not None:
        return value
    if "/" in value:
        raise TopicError(f"{what} topic has extra levels: {_shown(topic)}", segment=None)
    try:
        check_segment(value, what)
    except TopicError as exc:
        raise TopicError(f"{exc} (in topic {_shown(topic)})", segment=exc.segment) from None
    raise AssertionError("unreachable")  # pragma: no cover


_NOT_SET = ""


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic builders and subscription patterns for one installation (prefix) and one site."""

    site: str
    prefix: str = "outpost"
    # the heads the parsers match, built once (not part of the value: no init, repr or compare)
    _root: str = field(default=_NOT_SET, init=False, repr=False, compare=False)
    _installation: str = field(default=_NOT_SET, init=False, repr=False, compare=False)
    _events: str = field(default=_NOT_SET, init=False, repr=False, compare=False)
    _inference: str = field(default=_NOT_SET, init=False, repr=False, compare=False)
    _memory_req: str = field(default=_NOT_SET, init=False, repr=False, compare=False)
    _memory_resp: str = field(default=_NOT_SET, init=False, repr=False, compare=False)
    _decisions: str = field(default=_NOT_SET, init=False, repr=False, compare=False)
    _escalations: str = field(default=_NOT_SET, init=False, repr=False, compare=False)
    _actions: str = field(default=_NOT_SET, init=False, repr=False, compare=False)
    _telemetry_re: re.Pattern[str] = field(default=re.compile(""), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_segment(self.prefix, "prefix")
        check_segment(self.site, "site")
        root = f"{self.prefix}/{VERSION}/{self.site}"
        for name, value in (
            ("_root", root),
            ("_installation", f"{self.prefix}/{VERSION}/"),
            ("_events", f"{root}/events/"),
            ("_inference", f"{root}/inference/"),
            ("_memory_req", f"{root}/memory/req/"),
            ("_memory_resp", f"{root}/memory/resp/"),
            ("_decisions", f"{root}/decisions/"),
            ("_escalations", f"{root}/escalations/"),
            ("_actions", f"{root}/actions/"),
        ):
            object.__setattr__(self, name, value)
        # ingest's hot path: a well-formed telemetry topic in one match (the checks one by one
        # cost 1.7 us a message); anything else takes the precise path that says why
        pattern = re.escape(f"{root}/dev/") + r"([A-Za-z0-9_-]{1,64})/telemetry"
        object.__setattr__(self, "_telemetry_re", re.compile(pattern))

    @property
    def root(self) -> str:
        return self._root

    def _not_ours(self, kind: str, topic: str) -> TopicError:
        return TopicError(f"not {kind} topic of site {self.site!r}: {_shown(topic)}")

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
    def all_device_topics(self) -> str:
        """Everything under ``.../dev/``: ingest subscribes to it rather than to
        :attr:`all_telemetry` so that a telemetry topic with extra levels (a device id with ``/``)
        reaches it and is dead-lettered as ``bad_topic`` instead of matching nothing."""
        return f"{self.root}/dev/#"

    def telemetry_device(self, topic: str) -> str | None:
        """The device of a ``.../dev/{device}/telemetry`` topic; None for another kind of device
        topic (``status``, ``cmd/...``); TopicError for a telemetry topic whose device level is
        invalid or is more than one level (``dev/a/b/telemetry``)."""
        m = self._telemetry_re.fullmatch(topic)
        if m is not None:
            return m.group(1)
        if not topic.endswith("/telemetry"):
            return None
        root = self.root + "/dev/"
        if not topic.startswith(root):
            raise TopicError(f"not a device topic of site {self.site!r}: {topic[:200]!r}")
        device = topic[len(root) : -len("/telemetry")]
        if "/" in device:
            raise TopicError(
                f"telemetry topic has {device.count('/') + 1} levels between dev/ and /telemetry, "
                f"expected one (a device id cannot contain '/'): {topic[:200]!r}"
            )
        return check_segment(device, "device")

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

    def event_device(self, topic: str) -> str:
        """The device of an ``.../events/{device}`` topic."""
        if not topic.startswith(self._events):
            raise self._not_ours("an events", topic)
        return _level(topic[len(self._events) :], "device", topic)

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

    def score_of(self, topic: str) -> tuple[str, str]:
        """(model, device) of an ``.../inference/{model}/{device}`` topic."""
        if not topic.startswith(self._inference):
            raise self._not_ours("an inference", topic)
        model, sep, device = topic[len(self._inference) :].partition("/")
        if not sep:
            raise TopicError(f"inference topic has no device level: {_shown(topic)}")
        return _level(model, "model", topic), _level(device, "device", topic)

    def memory_request(self, op: str) -> str:
        """Requests to the memory service (MQTT 5: the answer goes to the response topic)."""
        return f"{self.root}/memory/req/{check_segment(op, 'operation')}"

    @property
    def all_memory_requests(self) -> str:
        return f"{self.root}/memory/req/+"

    def memory_op(self, topic: str) -> str:
        """The operation of a ``.../memory/req/{op}`` topic."""
        if not topic.startswith(self._memory_req):
            raise self._not_ours("a memory request", topic)
        return _level(topic[len(self._memory_req) :], "operation", topic)

    def memory_response(self, client: str) -> str:
        """Where a memory client wants its answers (it says so in each request)."""
        return f"{self.root}/memory/resp/{check_segment(client, 'client')}"

    def memory_response_client(self, topic: str) -> str:
        """The client of a ``.../memory/resp/{client}`` topic of this site: the only topics memory
        answers on. Anything else (another part's topic such as ``events/x`` or ``dlq/x``, a
        wildcard, another site, an extra level) raises TopicError: an answer published there would
        be injected into what others read."""
        if not topic.startswith(self._memory_resp):
            raise self._not_ours("a memory response", topic)
        return _level(topic[len(self._memory_resp) :], "client", topic)

    # --- uplink: what crosses to and from the cloud (the edge broker's bridge carries up/ and down/)
    def up(self, part: str, stream: str) -> str:
        """What a part of the site sends to the cloud (the uplink: ``up/uplink/{stream}``)."""
        return f"{self.root}/up/{check_segment(part, 'part')}/{check_segment(stream, 'stream')}"

    def down(self, part: str, name: str) -> str:
        """What the cloud sends to a part of the site (the uplink: ``down/uplink/ack``)."""
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

    def site_up_of(self, topic: str) -> tuple[str, str, str]:
        """(site, part, stream) of ``{prefix}/v1/{site}/up/{part}/{stream}`` for any site of this
        installation (the cloud's view, what :meth:`every_site_up` receives)."""
        if not topic.startswith(self._installation):
            raise TopicError(f"not a topic of installation {self.prefix!r}: {_shown(topic)}")
        levels = topic[len(self._installation) :].split("/")
        if len(levels) != 4 or levels[1] != "up":
            raise TopicError(f"not an {{site}}/up/{{part}}/{{stream}} topic: {_shown(topic)}")
        return (
            _level(levels[0], "site", topic),
            _level(levels[2], "part", topic),
            _level(levels[3], "stream", topic),
        )

    # --- the outbox: what a part hands the uplink service to take to the cloud (never bridged)
    def outbox(self, part: str, stream: str) -> str:
        """What a part of the site hands the uplink service's outbox (memory sync:
        ``outbox/memory/{stream}``); the uplink takes it to the cloud on ``up/uplink/memory``."""
        return f"{self.root}/outbox/{check_segment(part, 'part')}/{check_segment(stream, 'stream')}"

    def outbox_ack(self, part: str, stream: str) -> str:
        """Where the uplink service says how far its outbox holds a part's stream."""
        return f"{self.outbox(part, stream)}/ack"

    def all_outbox(self, part: str) -> str:
        return f"{self.root}/outbox/{check_segment(part, 'part')}/+"

    def all_outbox_acks(self, part: str) -> str:
        return f"{self.all_outbox(part)}/ack"

    def outbox_of(self, topic: str) -> tuple[str, str]:
        """(part, stream) of an ``.../outbox/{part}/{stream}`` topic of this site."""
        head = f"{self.root}/outbox/"
        if not topic.startswith(head):
            raise self._not_ours("an outbox", topic)
        part, sep, stream = topic[len(head) :].partition("/")
        if not sep:
            raise TopicError(f"outbox topic has no stream level: {_shown(topic)}")
        return _level(part, "part", topic), _level(stream, "stream", topic)

    def uplink_state(self) -> str:
        """Where Mosquitto reports its bridge to the cloud up (``1``) or down (``0``), retained: the
        bridge's client id is ``{prefix}-{site}-uplink`` (:mod:`outpost.broker`)."""
        return f"$SYS/broker/connection/{self.prefix}-{self.site}-uplink/state"

    # --- downlink: what the cloud sends the site (outpost.downlink), and what the site answers
    def down_desired(self, service: str) -> str:
        """A service's desired state from the cloud (retained there), republished on the site's
        :meth:`control` ``desired`` topic when newer than what was applied."""
        return f"{self.root}/down/desired/{check_segment(service, 'service')}"

    @property
    def all_down_desired(self) -> str:
        return f"{self.root}/down/desired/+"

    def down_desired_service(self, topic: str) -> str:
        """The service of a ``.../down/desired/{service}`` topic."""
        head = f"{self.root}/down/desired/"
        if not topic.startswith(head):
            raise self._not_ours("a desired-state", topic)
        return _level(topic[len(head) :], "service", topic)

    def down_cmd(self, target: str) -> str:
        """A command from the cloud for ``target`` (a kind of local input: ``action``, ...)."""
        return f"{self.root}/down/cmd/{check_segment(target, 'target')}"

    @property
    def all_down_cmds(self) -> str:
        return f"{self.root}/down/cmd/+"

    def down_cmd_target(self, topic: str) -> str:
        """The target of a ``.../down/cmd/{target}`` topic."""
        head = f"{self.root}/down/cmd/"
        if not topic.startswith(head):
            raise self._not_ours("a command", topic)
        return _level(topic[len(head) :], "target", topic)

    @property
    def cmd_results(self) -> str:
        """What came of each command from the cloud (applied, expired, duplicate, rejected)."""
        return f"{self.root}/up/cmd/results"

    # --- agents and connectors -------------------------------------------------------------------
    def decisions(self, agent: str) -> str:
        return f"{self.root}/decisions/{check_segment(agent, 'agent')}"

    @property
    def all_decisions(self) -> str:
        return f"{self.root}/decisions/+"

    def decision_agent(self, topic: str) -> str:
        """The agent of a ``.../decisions/{agent}`` topic."""
        if not topic.startswith(self._decisions):
            raise self._not_ours("a decisions", topic)
        return _level(topic[len(self._decisions) :], "agent", topic)

    def escalations(self, agent: str) -> str:
        """What an agent asks a person (its replies: :meth:`escalation_reply`)."""
        return f"{self.root}/escalations/{check_segment(agent, 'agent')}"

    @property
    def all_escalations(self) -> str:
        return f"{self.root}/escalations/+"

    def escalation_reply(self, agent: str, decision: str) -> str:
        return (
            f"{self.root}/escalations/{check_segment(agent, 'agent')}/"
            f"{check_segment(decision, 'decision')}/reply"
        )

    @property
    def all_escalation_replies(self) -> str:
        return f"{self.root}/escalations/+/+/reply"

    def escalation_replies(self, agent: str) -> str:
        """The pattern of the replies to ``agent``'s escalations (what an agent subscribes to)."""
        return f"{self.root}/escalations/{check_segment(agent, 'agent')}/+/reply"

    def escalation_reply_of(self, topic: str) -> tuple[str, str]:
        """(agent, decision) of an ``.../escalations/{agent}/{decision}/reply`` topic."""
        if not topic.startswith(self._escalations) or not topic.endswith("/reply"):
            raise self._not_ours("an escalation reply", topic)
        agent, sep, decision = topic[len(self._escalations) : -len("/reply")].partition("/")
        if not sep:
            raise TopicError(f"escalation reply topic has no decision level: {_shown(topic)}")
        return _level(agent, "agent", topic), _level(decision, "decision", topic)

    def actions(self, connector: str) -> str:
        return f"{self.root}/actions/{check_segment(connector, 'connector')}"

    @property
    def all_actions(self) -> str:
        return f"{self.root}/actions/+"

    def action_connector(self, topic: str) -> str:
        """The connector of an ``.../actions/{connector}`` (request) topic; a results topic is refused
        (:meth:`action_results_connector`)."""
        if not topic.startswith(self._actions):
            raise self._not_ours("an action request", topic)
        return _level(topic[len(self._actions) :], "connector", topic)

    def action_results(self, connector: str) -> str:
        return f"{self.root}/actions/{check_segment(connector, 'connector')}/results"

    @property
    def all_action_results(self) -> str:
        return f"{self.root}/actions/+/results"

    def action_results_connector(self, topic: str) -> str:
        """The connector of an ``.../actions/{connector}/results`` topic."""
        if not topic.startswith(self._actions) or not topic.endswith("/results"):
            raise self._not_ours("an action results", topic)
        return _level(topic[len(self._actions) : -len("/results")], "connector", topic)

    # --- telemetry's own output, for the uplink ---------------------------------------------------
    @property
    def telemetry_alerts(self) -> str:
        """The alerts of each closed rollup window (the telemetry service), one message each."""
        return f"{self.root}/telemetry/alerts"

    @property
    def telemetry_rollups(self) -> str:
        """The points of each closed rollup window (the telemetry service), one message a window."""
        return f"{self.root}/telemetry/rollups"

    # --- every service ---------------------------------------------------------------------------

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
