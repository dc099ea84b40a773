"""The kinds of connector, by name: each module's ``KIND`` (docs/connectors.md)."""

from __future__ import annotations

from outpost.services.connectors.kinds import http
from outpost.services.connectors.kinds.base import Kind

KINDS: dict[str, Kind] = {k.name: k for k in (http.KIND,)}
