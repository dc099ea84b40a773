"""The site's containers, where it runs under docker compose: what ``outpost status`` shows of them
(docs/deploy.md).

Every Outpost image carries the label :data:`LABEL` (compose/Dockerfile, compose/Dockerfile.mosquitto)
and a container inherits its image's labels, so the containers of a site's stack are found by that
label through the Docker engine's API (the ``docker`` SDK), whatever the compose project is named.
For each: its compose service, state, health (its HEALTHCHECK's verdict), how often the engine
restarted it (its restart policy at work) and since when it runs. No engine reachable (a site run by
``outpost up``, or a user without access to the engine's socket) is not an error: nothing is shown.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

LABEL = "org.outpost.image"
"""The label every Outpost image sets; its value names the image (``outpost``, ``mosquitto``)."""

ENGINE_TIMEOUT_S = 2
"""How long ``outpost status`` waits for the engine: it must never hang on a busy or absent one."""


@dataclass(frozen=True, slots=True)
class Container:
    name: str
    image: str
    """The :data:`LABEL` value: which Outpost image it runs."""
    service: str | None
    """Its compose service (None for a container compose did not make)."""
    project: str | None
    state: str
    """The engine's: ``running``, ``restarting``, ``exited``, ..."""
    health: str | None
    """``healthy``, ``unhealthy`` or ``starting``; None without a HEALTHCHECK."""
    restarts: int
    started_at: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def from_inspect(attrs: dict[str, Any]) -> Container:
    """A container from the engine's inspect document (``docker inspect``'s JSON, the SDK's
    ``Container.attrs``); fields it lacks are None, never an error."""
    config = attrs.get("Config") or {}
    labels = config.get("Labels") or {}
    state = attrs.get("State") or {}
    health = state.get("Health") or {}
    restarts = attrs.get("RestartCount")
    return Container(
        name=str(attrs.get("Name") or "").lstrip("/") or str(attrs.get("Id", ""))[:12],
        image=str(labels.get(LABEL, "")),
        service=labels.get("com.docker.compose.service"),
        project=labels.get("com.docker.compose.project"),
        state=str(state.get("Status") or "unknown"),
        health=health.get("Status"),
        restarts=restarts if isinstance(restarts, int) else 0,
        started_at=state.get("StartedAt") if state.get("Running") else None,
    )


def site_containers() -> list[Container] | None:
    """Outpost's containers on the local engine (``DOCKER_HOST`` or its default socket), by name;
    None when no engine answers within :data:`ENGINE_TIMEOUT_S`."""
    import docker
    from docker.errors import DockerException
    from requests.exceptions import RequestException

    try:
        client = docker.from_env(timeout=ENGINE_TIMEOUT_S)
    except DockerException:
        return None
    try:
        found = client.containers.list(all=True, filters={"label": LABEL})
        return sorted((from_inspect(c.attrs) for c in found), key=lambda c: c.name)
    except (DockerException, RequestException):
        return None
    finally:
        client.close()
