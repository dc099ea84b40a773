"""Topic builders, patterns and the identifier rule ``[A-Za-z0-9_-]{1,64}`` (docs/design.md, Topics)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from outpost.errors import TopicError
from outpost.topics import MAX_SEGMENT, Topics, check_segment, is_segment, shared

T = Topics(site="s1")

BAD_SEGMENTS = [
    pytest.param("+", id="plus"),
    pytest.param("#", id="hash"),
    pytest.param("dev+", id="plus-inside"),
    pytest.param("a#b", id="hash-inside"),
    pytest.param("a/b", id="slash"),
    pytest.param("/", id="slash-only"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("", id="empty"),
    pytest.param("x" * 65, id="65-chars"),
    pytest.param("x" * 1000, id="1000-chars"),
    pytest.param("a b", id="space"),
    pytest.param("a.b", id="dot"),
    pytest.param("a*b", id="star"),
    pytest.param("dév", id="non-ascii"),
    pytest.param("abc\n", id="trailing-newline"),
    pytest.param("$SYS", id="dollar"),
]


@pytest.mark.parametrize("value", BAD_SEGMENTS)
def test_bad_segments_are_refused(value: str) -> None:
    assert not is_segment(value)
    with pytest.raises(TopicError):
        check_segment(value, "device")


@pytest.mark.parametrize("value", ["a", "A-Z_0-9", "x" * 64, "dev-001", "_", "-"])
def test_good_segments_pass(value: str) -> None:
    assert is_segment(value)
    assert check_segment(value) == value


def test_segment_error_says_why() -> None:
    with pytest.raises(TopicError, match="longer than 64") as exc:
        check_segment("y" * 65, "device")
    # an over-long value is shown truncated, never echoed whole
    assert exc.value.segment == "y" * MAX_SEGMENT + "..."
    with pytest.raises(TopicError, match="empty"):
        check_segment("", "device")
    with pytest.raises(TopicError, match="only A-Z"):
        check_segment("a+b", "device")


def test_non_string_segment_is_refused() -> None:
    with pytest.raises(TopicError, match="must be a string"):
        check_segment(5, "device")  # type: ignore[arg-type]


def test_topic_error_is_a_value_error() -> None:
    assert issubclass(TopicError, ValueError)


@pytest.mark.parametrize("field", ["site", "prefix"])
@pytest.mark.parametrize("value", ["", "a/b", "+", "#", "x" * 65])
def test_topics_refuses_bad_site_and_prefix(field: str, value: str) -> None:
    kwargs = {"site": "s1", "prefix": "outpost", field: value}
    with pytest.raises(TopicError):
        Topics(**kwargs)


def test_builders() -> None:
    assert T.root == "outpost/v1/s1"
    assert T.telemetry("d1") == "outpost/v1/s1/dev/d1/telemetry"
    assert T.device_status("d1") == "outpost/v1/s1/dev/d1/status"
    assert T.device_cmd("d1", "reboot") == "outpost/v1/s1/dev/d1/cmd/reboot"
    assert T.events("d1") == "outpost/v1/s1/events/d1"
    assert T.dlq("ingest") == "outpost/v1/s1/dlq/ingest"
    assert T.inference("m1", "d1") == "outpost/v1/s1/inference/m1/d1"
    assert T.decisions("a1") == "outpost/v1/s1/decisions/a1"
    assert T.actions("c1") == "outpost/v1/s1/actions/c1"
    assert T.metrics("ingest") == "outpost/v1/s1/metrics/ingest"
    assert T.service_status("ingest") == "outpost/v1/s1/svc/ingest/status"
    assert T.control("ingest", "desired") == "outpost/v1/s1/control/ingest/desired"
    assert T.control("ingest", "reported") == "outpost/v1/s1/control/ingest/reported"


def test_patterns() -> None:
    assert T.all_telemetry == "outpost/v1/s1/dev/+/telemetry"
    assert T.all_device_status == "outpost/v1/s1/dev/+/status"
    assert T.all_events == "outpost/v1/s1/events/+"
    assert T.all_dlq == "outpost/v1/s1/dlq/+"
    assert T.all_metrics == "outpost/v1/s1/metrics/+"
    assert T.all_service_status == "outpost/v1/s1/svc/+/status"


def test_prefix_is_configurable() -> None:
    t = Topics(site="s2", prefix="other")
    assert t.telemetry("d") == "other/v1/s2/dev/d/telemetry"


@pytest.mark.parametrize("value", BAD_SEGMENTS)
def test_builders_refuse_bad_identifiers(value: str) -> None:
    builders: list[Callable[[], str]] = [
        lambda: T.telemetry(value),
        lambda: T.device_status(value),
        lambda: T.device_cmd("d1", value),
        lambda: T.device_cmd(value, "reboot"),
        lambda: T.events(value),
        lambda: T.dlq(value),
        lambda: T.inference(value, "d1"),
        lambda: T.inference("m1", value),
        lambda: T.decisions(value),
        lambda: T.actions(value),
        lambda: T.metrics(value),
        lambda: T.service_status(value),
        lambda: T.control(value, "desired"),
    ]
    for build in builders:
        with pytest.raises(TopicError):
            build()


def test_control_kind_is_checked() -> None:
    with pytest.raises(TopicError):
        T.control("ingest", "wanted")


def test_device_of() -> None:
    assert T.device_of("outpost/v1/s1/dev/d-1/telemetry") == "d-1"
    assert T.device_of("outpost/v1/s1/dev/d_2/status") == "d_2"
    assert T.device_of(T.device_cmd("d3", "x")) == "d3"


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("outpost/v1/other/dev/d1/telemetry", id="other-site"),
        pytest.param("other/v1/s1/dev/d1/telemetry", id="other-prefix"),
        pytest.param("outpost/v1/s1/events/d1", id="not-a-device-topic"),
        pytest.param("outpost/v1/s1/dev/d1", id="no-kind-level"),
        pytest.param("outpost/v1/s1/dev//telemetry", id="empty-device"),
        pytest.param("outpost/v1/s1/dev/" + "x" * 65 + "/telemetry", id="65-char-device"),
        pytest.param("outpost/v1/s1/dev/a*b/telemetry", id="star"),
        pytest.param("outpost/v1/s1/dev/a.b/telemetry", id="dot"),
        pytest.param("outpost/v1/s1/dev/a\x00b/telemetry", id="nul"),
        pytest.param("outpost/v1/s1/dev/+/telemetry", id="plus"),
        pytest.param("", id="empty"),
    ],
)
def test_device_of_refuses(topic: str) -> None:
    with pytest.raises(TopicError):
        T.device_of(topic)


def test_shared_subscription() -> None:
    assert shared("g1", T.all_telemetry) == "$share/g1/outpost/v1/s1/dev/+/telemetry"
    with pytest.raises(TopicError):
        shared("g/1", T.all_telemetry)
    with pytest.raises(TopicError):
        shared("", T.all_telemetry)


# --- parsers: every one is the inverse of its builder, and refuses everything else -------------------
ROOT = "outpost/v1/s1"


def test_new_builders_and_patterns() -> None:
    assert T.escalations("a1") == f"{ROOT}/escalations/a1"
    assert T.escalation_reply("a1", "dec-9") == f"{ROOT}/escalations/a1/dec-9/reply"
    assert T.escalation_replies("a1") == f"{ROOT}/escalations/a1/+/reply"
    assert T.action_results("c1") == f"{ROOT}/actions/c1/results"
    assert T.all_decisions == f"{ROOT}/decisions/+"
    assert T.all_escalations == f"{ROOT}/escalations/+"
    assert T.all_escalation_replies == f"{ROOT}/escalations/+/+/reply"
    assert T.all_actions == f"{ROOT}/actions/+"
    assert T.all_action_results == f"{ROOT}/actions/+/results"


@pytest.mark.parametrize("value", BAD_SEGMENTS)
def test_new_builders_refuse_bad_identifiers(value: str) -> None:
    builders: list[Callable[[], str]] = [
        lambda: T.escalations(value),
        lambda: T.escalation_reply(value, "d1"),
        lambda: T.escalation_reply("a1", value),
        lambda: T.escalation_replies(value),
        lambda: T.action_results(value),
    ]
    for build in builders:
        with pytest.raises(TopicError):
            build()


GOOD_IDS = ["a", "x" * 64, "dev-001", "A_b-9", "_", "-", "up", "results", "reply"]


@pytest.mark.parametrize("ident", GOOD_IDS)
def test_parsers_invert_builders(ident: str) -> None:
    assert T.event_device(T.events(ident)) == ident
    assert T.score_of(T.inference(ident, "d1")) == (ident, "d1")
    assert T.score_of(T.inference("m1", ident)) == ("m1", ident)
    assert T.memory_op(T.memory_request(ident)) == ident
    assert T.decision_agent(T.decisions(ident)) == ident
    assert T.action_connector(T.actions(ident)) == ident
    assert T.action_results_connector(T.action_results(ident)) == ident
    assert T.escalation_reply_of(T.escalation_reply(ident, "d9")) == (ident, "d9")
    assert T.escalation_reply_of(T.escalation_reply("a1", ident)) == ("a1", ident)
    assert T.site_up_of(Topics(site=ident).up("memory", "ltm")) == (ident, "memory", "ltm")
    assert T.site_up_of(T.up(ident, "log")) == ("s1", ident, "log")
    assert T.site_up_of(T.up("memory", ident)) == ("s1", "memory", ident)


def test_site_up_of_reads_any_site_of_the_installation() -> None:
    cloud = Topics(site="cloud")
    assert cloud.site_up_of("outpost/v1/shop-7/up/memory/ltm") == ("shop-7", "memory", "ltm")
    assert cloud.site_up_of(Topics(site="s1").up("memory", "log")) == ("s1", "memory", "log")
    other = Topics(site="cloud", prefix="acme")
    with pytest.raises(TopicError, match="installation 'acme'"):
        other.site_up_of("outpost/v1/s1/up/memory/ltm")


HOSTILE_LEVELS = [
    pytest.param("+", id="plus"),
    pytest.param("#", id="hash"),
    pytest.param("", id="empty"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("x" * 65, id="65-chars"),
    pytest.param("a b", id="space"),
    pytest.param("dév", id="non-ascii"),
    pytest.param("a.b", id="dot"),
    pytest.param("$SYS", id="dollar"),
]


def _each_parser() -> list[tuple[str, Callable[[str], object], Callable[[str], str]]]:
    """(name, parser, a topic of the parser's kind with one identifier replaced by ``x``)."""
    return [
        ("event_device", T.event_device, lambda x: f"{ROOT}/events/{x}"),
        ("score_of:model", T.score_of, lambda x: f"{ROOT}/inference/{x}/d1"),
        ("score_of:device", T.score_of, lambda x: f"{ROOT}/inference/m1/{x}"),
        ("memory_op", T.memory_op, lambda x: f"{ROOT}/memory/req/{x}"),
        ("decision_agent", T.decision_agent, lambda x: f"{ROOT}/decisions/{x}"),
        ("action_connector", T.action_connector, lambda x: f"{ROOT}/actions/{x}"),
        ("action_results_connector", T.action_results_connector, lambda x: f"{ROOT}/actions/{x}/results"),
        ("escalation_reply_of:agent", T.escalation_reply_of, lambda x: f"{ROOT}/escalations/{x}/d1/reply"),
        ("escalation_reply_of:decision", T.escalation_reply_of, lambda x: f"{ROOT}/escalations/a1/{x}/reply"),
        ("site_up_of:site", T.site_up_of, lambda x: f"outpost/v1/{x}/up/memory/ltm"),
        ("site_up_of:part", T.site_up_of, lambda x: f"outpost/v1/s1/up/{x}/ltm"),
        ("site_up_of:stream", T.site_up_of, lambda x: f"outpost/v1/s1/up/memory/{x}"),
        ("device_of", T.device_of, lambda x: f"{ROOT}/dev/{x}/telemetry"),
    ]


PARSERS = [pytest.param(p, f, id=name) for name, p, f in _each_parser()]
# device_of reads the device of any .../dev/{device}/... topic (telemetry, status, cmd/{name}), so
# what follows the device level is not its to check
EXACT_PARSERS = [pytest.param(p, f, id=name) for name, p, f in _each_parser() if name != "device_of"]


@pytest.mark.parametrize(("parse", "topic_with"), PARSERS)
@pytest.mark.parametrize("level", HOSTILE_LEVELS)
def test_parsers_refuse_hostile_identifiers(
    parse: Callable[[str], object], topic_with: Callable[[str], str], level: str
) -> None:
    parse(topic_with("ok-1"))  # the same topic with a good identifier parses
    with pytest.raises(TopicError):
        parse(topic_with(level))


@pytest.mark.parametrize(("parse", "topic_with"), EXACT_PARSERS)
def test_parsers_refuse_extra_and_missing_levels(
    parse: Callable[[str], object], topic_with: Callable[[str], str]
) -> None:
    with pytest.raises(TopicError):
        parse(topic_with("a/b"))  # one level more
    with pytest.raises(TopicError):
        parse(topic_with("ok") + "/extra")
    with pytest.raises(TopicError):
        parse(topic_with("ok") + "/")
    with pytest.raises(TopicError):
        parse("")
    with pytest.raises(TopicError):
        parse("/" + topic_with("ok"))


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("outpost/v1/s2/events/d1", id="other-site"),
        pytest.param("other/v1/s1/events/d1", id="other-prefix"),
        pytest.param("outpost/v2/s1/events/d1", id="other-version"),
        pytest.param("outpost/v1/s1/event/d1", id="other-kind"),
        pytest.param("outpost/v1/s1/events", id="no-device-level"),
        pytest.param("outpost/v1/s1/events/", id="empty-device"),
        pytest.param("outpost/v1/s1/events//d1", id="empty-level"),
        pytest.param("outpost/v1/s1/events/d1/x", id="extra-level"),
        pytest.param("outpost/v1/s1/dev/d1/telemetry", id="telemetry"),
        pytest.param("outpost/v1/s10/events/d1", id="site-prefix-of-another"),
        pytest.param("outpost/v1/s1/eventsd1", id="no-separator"),
    ],
)
def test_event_device_refuses(topic: str) -> None:
    with pytest.raises(TopicError):
        T.event_device(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "outpost/v1/s2/inference/m1/d1",
        "outpost/v1/s1/inference/m1",
        "outpost/v1/s1/inference/m1/",
        "outpost/v1/s1/inference//d1",
        "outpost/v1/s1/inference/m1/d1/x",
        "outpost/v1/s1/inference/+/+",
        "outpost/v1/s1/inference/#",
    ],
)
def test_score_of_refuses(topic: str) -> None:
    with pytest.raises(TopicError):
        T.score_of(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "outpost/v1/s1/escalations/a1",  # the escalation itself, not a reply
        "outpost/v1/s1/escalations/a1/reply",
        "outpost/v1/s1/escalations/reply",
        "outpost/v1/s1/escalations/a1/d1/replies",
        "outpost/v1/s1/escalations/a1/d1/reply/x",
        "outpost/v1/s1/escalations/a1/x/d1/reply",
        "outpost/v1/s1/escalations//d1/reply",
        "outpost/v1/s1/escalations/a1//reply",
        "outpost/v1/s1/escalations/+/+/reply",
        "outpost/v1/s2/escalations/a1/d1/reply",
        "outpost/v1/s1/decisions/a1/d1/reply",
    ],
)
def test_escalation_reply_of_refuses(topic: str) -> None:
    with pytest.raises(TopicError):
        T.escalation_reply_of(topic)


def test_action_request_and_results_topics_are_told_apart() -> None:
    with pytest.raises(TopicError, match="extra levels"):
        T.action_connector(T.action_results("c1"))
    with pytest.raises(TopicError):
        T.action_results_connector(T.actions("c1"))
    with pytest.raises(TopicError):
        T.action_results_connector(f"{ROOT}/actions/results")  # no connector level


@pytest.mark.parametrize(
    "topic",
    [
        "outpost/v1/s1/up/memory",
        "outpost/v1/s1/up/memory/ltm/x",
        "outpost/v1/s1/down/memory/ack",
        "outpost/v1/s1/upx/memory/ltm",
        "outpost/v1/up/memory/ltm",
        "outpost/v1//up/memory/ltm",
        "outpost/v1/+/up/memory/+",
        "outpost/v1/#",
        "other/v1/s1/up/memory/ltm",
        "outpost/v2/s1/up/memory/ltm",
        "outpost/v1",
    ],
)
def test_site_up_of_refuses(topic: str) -> None:
    with pytest.raises(TopicError):
        T.site_up_of(topic)


def test_parser_errors_say_why_and_cap_the_topic() -> None:
    with pytest.raises(TopicError, match=r"not an events topic of site 's1'"):
        T.event_device("outpost/v1/s2/events/d1")
    with pytest.raises(TopicError, match="extra levels"):
        T.event_device(f"{ROOT}/events/d1/x")
    with pytest.raises(TopicError, match="invalid device '\\+'") as exc:
        T.event_device(f"{ROOT}/events/+")
    assert exc.value.segment == "+"
    with pytest.raises(TopicError, match="empty"):
        T.memory_op(f"{ROOT}/memory/req/")
    with pytest.raises(TopicError, match="no device level"):
        T.score_of(f"{ROOT}/inference/m1")
    with pytest.raises(TopicError, match="longer than 64") as exc:
        T.decision_agent(f"{ROOT}/decisions/" + "y" * 10_000)
    assert len(str(exc.value)) < 600  # a hostile topic is never echoed whole


def test_parsers_take_the_sites_own_topics_only() -> None:
    t2 = Topics(site="s2", prefix="other")
    assert t2.event_device("other/v1/s2/events/d1") == "d1"
    with pytest.raises(TopicError):
        t2.event_device("outpost/v1/s2/events/d1")
    with pytest.raises(TopicError):
        T.event_device(t2.events("d1"))


def test_topics_value_is_site_and_prefix_only() -> None:
    assert Topics(site="s1") == T
    assert hash(Topics(site="s1")) == hash(T)
    assert repr(T) == "Topics(site='s1', prefix='outpost')"
    assert Topics(site="s1") != Topics(site="s1", prefix="other")


def test_memory_response_client_is_the_inverse_of_its_builder() -> None:
    assert T.memory_response_client(T.memory_response("agent-1")) == "agent-1"


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param(f"{ROOT}/events/x", id="events"),
        pytest.param(f"{ROOT}/dlq/x", id="dlq"),
        pytest.param(f"{ROOT}/memory/resp/+", id="plus"),
        pytest.param(f"{ROOT}/memory/resp/#", id="hash"),
        pytest.param(f"{ROOT}/memory/resp/a/b", id="extra-level"),
        pytest.param(f"{ROOT}/memory/resp/", id="empty-client"),
        pytest.param("outpost/v1/s2/memory/resp/a", id="other-site"),
        pytest.param("other/v1/s1/memory/resp/a", id="other-prefix"),
        pytest.param(f"{ROOT}/memory/req/embed", id="a-request-topic"),
    ],
)
def test_memory_response_client_refuses_every_other_topic(topic: str) -> None:
    with pytest.raises(TopicError):
        T.memory_response_client(topic)
