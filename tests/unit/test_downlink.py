"""The downlink's decisions, pure: expired, duplicate, newer, and what a command becomes locally."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from outpost.contracts import Command, derived_id
from outpost.downlink import local_input, newer, verdict
from outpost.topics import Topics

NOW = 1_800_000_000_000_000_000
T = Topics(site="s1")


def command(**over: Any) -> Command:
    doc: dict[str, Any] = {
        "v": 1,
        "id": "c1",
        "ts": NOW - 10**9,
        "trace": "",
        "expires_ns": NOW + 60 * 10**9,
        "to": "shelf",
        "decision": "d1",
        "body": {"choice": "approve", "by": "ops@cloud"},
    }
    doc.update(over)
    return Command.model_validate(doc)


def test_a_command_in_time_and_new_is_applied() -> None:
    assert verdict(NOW + 1, NOW, seen=False) == "apply"
    assert verdict(NOW, NOW, seen=False) == "apply"  # at its expiry, still in time


def test_a_command_past_its_expiry_is_refused() -> None:
    assert verdict(NOW - 1, NOW, seen=False) == "expired"


def test_a_copy_is_a_duplicate_in_time_or_not() -> None:
    assert verdict(NOW + 1, NOW, seen=True) == "duplicate"
    assert verdict(NOW - 1, NOW, seen=True) == "duplicate"


def test_desired_state_newer_or_equal_goes_out_older_does_not() -> None:
    assert newer(5, None)
    assert newer(6, 5)
    assert newer(5, 5)  # republished: harmless, and covers a crash before the publish was confirmed
    assert not newer(4, 5)


def test_an_escalation_reply_command_becomes_the_agents_reply() -> None:
    topic, payload = local_input(command(), "escalation-reply", T)
    assert topic == T.escalation_reply("shelf", "d1")
    reply = orjson.loads(payload)
    assert reply["choice"] == "approve" and reply["by"] == "ops@cloud"
    assert reply["id"] == derived_id("downlink", "c1")  # a copy is recognised by the agent


def test_an_action_command_becomes_a_request_whose_deadline_is_the_expiry() -> None:
    body = {"key": "k1", "agent": "cloud", "capability": "notify.staff", "args": {"x": 1}}
    topic, payload = local_input(command(to="email", decision=None, body=body), "action", T)
    assert topic == T.actions("email")
    req = orjson.loads(payload)
    assert req["key"] == "k1" and req["deadline_ns"] == NOW + 60 * 10**9


@pytest.mark.parametrize(
    ("target", "over"),
    [
        ("escalation-reply", {"decision": None}),
        ("escalation-reply", {"body": {"choice": "approve"}}),  # no "by"
        ("action", {"body": {"key": "k1"}}),
        ("reboot", {}),
    ],
)
def test_a_body_that_makes_no_local_input_is_refused(target: str, over: dict[str, Any]) -> None:
    with pytest.raises((ValueError, ValidationError)):
        local_input(command(**over), target, T)
