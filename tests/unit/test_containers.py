"""What ``outpost status`` reads of a container: from the engine's inspect document (trimmed from a
real one of the compose test's stack, 2026-12-03), and what it makes of one missing its parts."""

from __future__ import annotations

from typing import Any

from outpost.containers import LABEL, Container, from_inspect

INSPECTED: dict[str, Any] = {
    "Id": "5f0c2a8e9b1d3c4e5f60718293a4b5c6d7e8f9001122334455667788990aabbc",
    "Name": "/outposttest16253-outpost-1",
    "RestartCount": 1,
    "State": {
        "Status": "running",
        "Running": True,
        "Restarting": False,
        "StartedAt": "2026-12-03T10:55:15.329645941Z",
        "Health": {"Status": "healthy", "FailingStreak": 0},
    },
    "Config": {
        "Labels": {
            "com.docker.compose.project": "outposttest16253",
            "com.docker.compose.service": "outpost",
            "com.docker.compose.version": "2.40.3",
            LABEL: "outpost",
        }
    },
}


def test_a_compose_container_with_its_health_and_restarts() -> None:
    assert from_inspect(INSPECTED) == Container(
        name="outposttest16253-outpost-1",
        image="outpost",
        service="outpost",
        project="outposttest16253",
        state="running",
        health="healthy",
        restarts=1,
        started_at="2026-12-03T10:55:15.329645941Z",
    )


def test_what_a_document_lacks_is_none_never_an_error() -> None:
    exited = {
        "Id": "0123456789abcdef",
        "State": {"Status": "exited", "Running": False, "StartedAt": "2026-12-03T10:00:00Z"},
        "Config": {"Labels": {LABEL: "mosquitto"}},
        "RestartCount": "not a number",
    }
    c = from_inspect(exited)
    assert (c.name, c.image, c.service, c.project) == ("0123456789ab", "mosquitto", None, None)
    assert (c.state, c.health, c.restarts, c.started_at) == ("exited", None, 0, None)
    assert from_inspect({}).state == "unknown"
