"""Topic builders, patterns and the identifier rule ``[A-Za-z0-9_-]{1,64}`` (DESIGN.md, Topics)."""

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
