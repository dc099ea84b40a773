"""The gateway's status page and Prometheus endpoint, run by the telemetry service
(docs/telemetry.md, Status page): :class:`~.server.StatusPage` with its
:class:`~.settings.PageSettings` (``telemetry.page``).

Kept free of imports: the service registry imports the page's settings, and the CLI the registry;
neither needs the web server (starlette, uvicorn) that :mod:`.server` imports.
"""
