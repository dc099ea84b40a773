"""The uplink service's settings: the site file's ``uplink:`` section (``OUTPOST_UPLINK__*``), the
core's :class:`outpost.settings.UplinkSettings` (the cloud broker, which ``outpost up`` writes into
its bridge) plus what the uplink service alone uses (docs/uplink.md, "Settings")."""

from __future__ import annotations

from pydantic import Field, field_validator

from outpost.settings import UplinkSettings
from outpost.topics import SEGMENT_RE

WEEK_S = 7 * 24 * 3600.0


class UplinkServiceSettings(UplinkSettings):
    """The uplink service (docs/uplink.md)."""

    events: list[str] = Field(
        default_factory=list,
        description="Device classes whose events go up (bulk: none by default); `*`: every device.",
    )
    max_bytes_s: int = Field(
        0, ge=0, description="Bandwidth cap in bytes/s over what is published upstream; 0: none."
    )
    max_outbox_mb: float = Field(
        500.0,
        gt=0,
        description="Disk budget of the outbox (records' bytes). Over it the oldest records of the "
        "lowest-priority stream go first (events, metrics, actions, decisions), never alerts; memory "
        "sync waits for room.",
    )
    max_age_s: float = Field(
        WEEK_S, gt=0, description="Records the cloud has not taken within this expire (never alerts)."
    )
    max_record_bytes: int = Field(
        256_000, ge=1024, le=4_000_000, description="Largest message taken; bigger ones are dead-lettered."
    )
    batch: int = Field(200, ge=1, le=10_000, description="Records per message upstream.")
    window: int = Field(4000, ge=1, description="Records in flight per stream, not yet acknowledged.")
    resend_s: float = Field(5.0, gt=0, description="Send again from the last acknowledged record after this.")
    commit_ms: float = Field(
        20.0, gt=0, le=1000, description="How long taken records wait for the outbox's batched commit."
    )

    @field_validator("events")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        for c in v:
            if c != "*" and SEGMENT_RE.fullmatch(c) is None:
                raise ValueError(f"a device class must match [A-Za-z0-9_-]{{1,64}} or be '*', got {c[:70]!r}")
        return v
