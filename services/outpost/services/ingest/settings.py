"""The ingest service's settings section, ``ingest:`` in the site file (``OUTPOST_INGEST__*``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from outpost.settings import Section


class IngestSettings(Section):
    qos: Literal[0, 1] = Field(1, description="QoS of the telemetry subscription and event publishes.")
    dlq_qos: Literal[0, 1] = Field(1, description="QoS of dead-letter publishes.")
    max_payload_bytes: int = Field(2_000_000, ge=256, description="Larger messages are dead-lettered.")
    max_batch: int = Field(10_000, ge=1, description="Most readings accepted in one message.")
    max_future_s: float = Field(300.0, ge=0, description="Readings stamped further ahead are rejected.")
    max_age_s: float = Field(7 * 86400.0, gt=0, description="Readings older than this are rejected.")
    dedup_window: int = Field(
        4096, ge=64, le=65536, description="Recent seqs per device remembered to drop duplicates."
    )
    rate_per_device: float = Field(1000.0, gt=0, description="Sustained readings/s allowed per device.")
    burst_per_device: float = Field(20_000.0, gt=0, description="Token-bucket burst per device.")
    quarantine_after: int = Field(
        2000, ge=1, description="Rate-limited readings within one second that put a device in quarantine."
    )
    quarantine_s: float = Field(30.0, gt=0, description="How long a flooding device stays quarantined.")
    quarantine_qos0_messages_per_s: int = Field(
        1000,
        ge=0,
        description=(
            "QoS 0 messages from one device within one second past which it is quarantined (a batch "
            "is one message; 0: no limit). Stops a flood of one-reading messages before the "
            "readings' burst is spent; QoS 1 messages (a backlog the broker kept) do not count."
        ),
    )
    flush_max: int = Field(500, ge=1, description="Events per device batch that trigger a flush.")
    commit_ms: float = Field(100.0, gt=0, description="How long confirmed dedup state waits for its commit.")
    mqtt5: bool = Field(
        False,
        description="Speak MQTT 5 instead of 3.1.1 (3.1.1 is ~10% cheaper per message in paho).",
    )

    @field_validator("qos", "dlq_qos", mode="before")
    @classmethod
    def _qos_from_text(cls, v: Any) -> Any:
        # Environment variables arrive as text, and a Literal[0, 1] does not coerce "1" to 1.
        if isinstance(v, str) and v.strip() in ("0", "1"):
            return int(v)
        return v
