"""The gateway's status page and Prometheus endpoint, run by the telemetry service
(docs/telemetry.md, Status page): :class:`StatusPage` with its :class:`PageSettings` (``telemetry.page``)."""

from outpost.services.telemetry.page.server import StatusPage
from outpost.services.telemetry.page.settings import PageSettings, page_url

__all__ = ["PageSettings", "StatusPage", "page_url"]
