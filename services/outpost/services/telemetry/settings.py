"""The telemetry service's settings: the site file's ``telemetry:`` section (``OUTPOST_TELEMETRY__*``),
the core's :class:`outpost.settings.TelemetrySettings` (``metrics_interval_s``, which every service
reads) plus what the telemetry service alone uses (docs/telemetry.md, "Settings")."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from outpost.contracts import Segment
from outpost.settings import Section, TelemetrySettings


class InfluxSettings(Section):
    """Where the rollups go: an InfluxDB 2 (or anything that speaks its v2 write API, such as
    VictoriaMetrics). Without ``url`` nothing leaves the site (rollups still feed the status page)."""

    url: str | None = Field(
        None,
        description="Base URL of the InfluxDB v2 write API, e.g. http://influx:8086; none: nothing upstream.",
    )
    org: str = Field("outpost", min_length=1, max_length=256, description="InfluxDB organization.")
    bucket: str = Field("outpost", min_length=1, max_length=256, description="InfluxDB bucket.")
    token: SecretStr | None = Field(
        None, description="API token; never logged, published or shown in errors."
    )
    timeout_s: float = Field(10.0, gt=0, le=300, description="Longest one write request may take.")
    batch_points: int = Field(5000, ge=1, le=100_000, description="Points per write request at most.")
    retry_max_s: float = Field(60.0, gt=0, description="Cap of the backoff between failed writes.")

    @field_validator("url")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/") if v else None


class TelemetryServiceSettings(TelemetrySettings):
    """The telemetry service (docs/telemetry.md): rollups, the uplink budget, the spool."""

    rollup_s: float = Field(60.0, gt=0, le=3600, description="Length of a rollup window (s).")
    influx: InfluxSettings = Field(default_factory=InfluxSettings)
    budget_bytes_per_min: int = Field(
        50_000,
        ge=0,
        description="Upstream bytes per minute (line protocol plus a fixed charge per request); 0: no limit. "
        "Over it, diagnostics are downsampled, then SLO points wait in the spool; alerts always go.",
    )
    spool_max_mb: float = Field(
        50.0, gt=0, description="Most the spool may hold; when full, the oldest diagnostics give way first."
    )
    raw_device_classes: list[Segment] = Field(
        default_factory=list,
        description="Device classes whose raw readings may leave the site (default: aggregates only).",
    )
    # page: PageSettings  -- the status page's settings (outpost.services.telemetry.page.settings),
    # added by the integrator with the page itself (OUTPOST_TELEMETRY__PAGE__PORT).
