"""The status page's settings: ``telemetry.page`` in the site file (``OUTPOST_TELEMETRY__PAGE__*``)."""

from __future__ import annotations

from pydantic import Field

from outpost.settings import Section


class PageSettings(Section):
    """Where the gateway serves its status page and Prometheus endpoint, and how much it keeps."""

    enabled: bool = Field(True, description="Serve the status page and /metrics.")
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on: loopback by default (the page has no login; "
        "put it behind the site's reverse proxy to show it further).",
    )
    port: int = Field(
        8787, ge=0, le=65535, description="TCP port; 0 picks a free one (`outpost up` picks and prints it)."
    )
    history_s: float = Field(
        600.0, gt=0, le=86_400, description="Seconds of history the live charts keep (in memory)."
    )
    poll_s: float = Field(1.0, ge=0.2, le=60, description="How often the page asks for new figures.")


def page_url(host: str, port: int) -> str:
    """The address a browser on this machine opens: a wildcard listen address is reached on loopback."""
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else "[::1]" if host == "::" else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"
