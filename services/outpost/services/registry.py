"""The service registry: every service Outpost runs, one line each, and the settings composed from them.

A row is (name, settings section, module): the name is the service's status name and its settings
section's key (``ingest:`` in the site file, ``OUTPOST_INGEST__*``); the module is what ``outpost up``
runs with ``python -m``. From this table follow:

- **the supervisor's list**: ``outpost up`` runs ``OutpostSettings.SERVICES`` (name -> module,
  in the table's order), which :class:`outpost.stack.Stack` hands to the supervisor;
- **the settings**: :class:`OutpostSettings` is the core's :class:`~outpost.settings.CoreSettings`
  plus one field per service section, and :func:`load_settings` loads it (site file, environment);
- **the package list**: every service is a package folder of ``services/outpost/services/``, which
  the wheel takes whole (tests/unit/test_packaging.py builds it and fails when one is missing).

Adding a service: its folder ``services/outpost/services/{name}/`` (``settings.py`` with its
section, ``service.py``, ``__main__.py``), its row in :data:`REGISTRY`, and its typed field in
:class:`OutpostSettings`, so that ``settings.{name}`` is typed for mypy and editors: two lines here,
checked to agree when this module is imported. A service without settings of its own takes ``None``
as its section and needs no field.

The layers (a lint rule, ruff's TID251 in pyproject.toml and services/ruff.toml, enforces them):
the core (``shared/outpost/``: ``outpost.*``) and the simulator import neither a service nor the
CLI; the services import the core and this registry; the benchmark harnesses (``outpost.benchmarks``) import
services; the CLI (``outpost.cli``) sits on top of everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field

from outpost import settings as core
from outpost.services.agent.settings import AgentSettings
from outpost.services.connectors.settings import ConnectorsSettings
from outpost.services.inference.settings import InferenceSettings
from outpost.services.ingest.settings import IngestSettings
from outpost.services.memory.settings import MemorySettings
from outpost.services.telemetry.settings import TelemetryServiceSettings
from outpost.services.uplink.settings import UplinkServiceSettings


@dataclass(frozen=True)
class Service:
    name: str
    """Status name, log file name and settings section key."""
    settings: type[core.Section] | None
    """The service's settings section, a field of :class:`OutpostSettings` named ``name``."""
    module: str
    """Run with ``python -m`` by ``outpost up``."""


REGISTRY: tuple[Service, ...] = (
    Service("ingest", IngestSettings, "outpost.services.ingest"),
    Service("inference", InferenceSettings, "outpost.services.inference"),
    Service("memory", MemorySettings, "outpost.services.memory"),
    Service("agents", AgentSettings, "outpost.services.agent"),
    Service("connectors", ConnectorsSettings, "outpost.services.connectors"),
    Service("telemetry", TelemetryServiceSettings, "outpost.services.telemetry"),
    Service("uplink", UplinkServiceSettings, "outpost.services.uplink"),
)
"""Every service ``outpost up`` runs, in the order it starts them."""


class OutpostSettings(core.CoreSettings):
    """Every setting of a site: the core's and one section per service of :data:`REGISTRY`."""

    SERVICES: ClassVar[dict[str, str]] = {s.name: s.module for s in REGISTRY}
    PRELOAD: ClassVar[dict[str, str]] = {s.name: f"{s.module}.service" for s in REGISTRY}
    """Each service's ``service.py`` (what its ``__main__`` runs), for the zygote to import."""

    ingest: IngestSettings = Field(default_factory=IngestSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    agents: AgentSettings = Field(default_factory=AgentSettings)
    connectors: ConnectorsSettings = Field(default_factory=ConnectorsSettings)
    telemetry: TelemetryServiceSettings = Field(default_factory=TelemetryServiceSettings)
    """The core's ``telemetry`` section (``metrics_interval_s``) widened by the telemetry service's own
    settings: the same key in the site file."""
    uplink: UplinkServiceSettings = Field(default_factory=UplinkServiceSettings)
    """The core's ``uplink`` section (the cloud broker, for the bridge) widened by the uplink
    service's own settings: the same key in the site file."""


def check_registry(table: tuple[Service, ...], composed: type[core.CoreSettings]) -> None:
    """The table and the typed fields must agree: a section with no field would be refused as an
    unknown key, and a field with no row would be settings for a service nobody runs."""
    names = [s.name for s in table]
    if len(set(names)) != len(names):
        raise TypeError(f"service registry: a name twice in {names}")
    sections = {s.name: s.settings for s in table if s.settings is not None}
    core_fields = core.CoreSettings.model_fields
    fields = {
        name: f.annotation
        for name, f in composed.model_fields.items()
        if name not in core_fields or f.annotation is not core_fields[name].annotation
    }
    if sections != fields:
        raise TypeError(
            f"service registry: the rows' settings sections {sections} differ from the fields "
            f"{composed.__name__} adds to CoreSettings {fields}"
        )


check_registry(REGISTRY, OutpostSettings)


def load_settings(**overrides: Any) -> OutpostSettings:
    """A site's settings (core and every service's section) from the site file, the environment and
    ``overrides``; any problem is one :class:`outpost.errors.ConfigError` naming every bad field."""
    return core.load_settings(OutpostSettings, **overrides)
