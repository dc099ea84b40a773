"""All of Outpost's settings, in one place.

Precedence: defaults < the site file (``outpost.yaml``, path in ``OUTPOST_CONFIG``) < ``OUTPOST_*``
environment variables (nested with ``__``, e.g. ``OUTPOST_MQTT__PORT``) < explicit arguments.
Unknown keys and bad values are errors at start (:class:`outpost.errors.ConfigError`), never ignored.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from outpost.errors import ConfigError
from outpost.services.inference.backends.config import AutoConfig, BackendConfig
from outpost.topics import SEGMENT_RE, Topics

CONFIG_ENV = "OUTPOST_CONFIG"
DEFAULT_CONFIG_FILE = "outpost.yaml"


class Section(BaseModel):
    """Base of every settings section: unknown keys are errors, values are checked on assignment,
    and a refused value is not repeated in the error (it may be a password)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)


class MqttSettings(Section):
    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker TCP port.")
    username: str | None = Field(None, description="User name, when the broker requires auth.")
    password: SecretStr | None = Field(None, description="Password; never logged or published.")
    keepalive: int = Field(30, ge=5, le=3600, description="MQTT keepalive in seconds.")
    reconnect_min_s: float = Field(0.2, gt=0, description="First reconnect delay (jittered).")
    reconnect_max_s: float = Field(15.0, gt=0, description="Cap of the exponential reconnect delay.")
    session_expiry_s: int = Field(
        3600, ge=0, description="How long the broker keeps a durable service's session while it is away."
    )
    max_inflight: int = Field(
        0,
        ge=0,
        le=65000,
        description="QoS 1 publishes in flight at once; 0 = no limit (paho rescans its in-flight list "
        "on every acknowledgement when a limit is set: 1000 in flight cut QoS 1 publishing to ~4k/s).",
    )


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
    flush_ms: float = Field(5.0, gt=0, le=1000, description="Longest time a validated event waits.")
    flush_max: int = Field(500, ge=1, description="Events per device batch that trigger a flush.")
    commit_ms: float = Field(100.0, gt=0, description="How often confirmed dedup state is committed.")
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


class InferenceSettings(Section):
    """The inference service (docs/inference.md): which models, on which backend, batched how."""

    models_dir: Path | None = Field(
        None, description="Folder of {name}/{version}/ model folders; default: the models Outpost ships."
    )
    models: list[str] = Field(
        default_factory=list, description="Model names to serve; empty = every model in models_dir."
    )
    backend: BackendConfig = Field(
        default_factory=AutoConfig, description="onnxruntime, tensorrt, or auto (the best that runs here)."
    )
    max_batch: int = Field(
        256, ge=1, le=4096, description="Most requests in one session call (batches fill only under load)."
    )
    max_wait_ms: float = Field(
        1.0,
        ge=0,
        le=1000,
        description="Longest a request waits for its batch to fill (Triton's max_queue_delay).",
    )
    qos: Literal[0, 1] = Field(1, description="QoS of the events subscription and score publishes.")
    reload_s: float = Field(0.5, gt=0, description="How often the registry state is checked for changes.")
    max_devices: int = Field(100_000, ge=1, description="Devices whose windows are kept (oldest forgotten).")
    checkpoint_s: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="How often changed windows are checkpointed to SQLite (restart resumes).",
    )

    @field_validator("qos", mode="before")
    @classmethod
    def _qos_from_text(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip() in ("0", "1"):
            return int(v)
        return v

    @field_validator("models")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if SEGMENT_RE.fullmatch(name) is None:
                raise ValueError(f"model name {name!r} must match [A-Za-z0-9_-]{{1,64}}")
        return v


class MemorySettings(Section):
    """The memory service: operational log, short-term context, long-term memory (docs/memory.md)."""

    log_sync: Literal["OFF", "NORMAL", "FULL"] = Field(
        "FULL", description="SQLite synchronous for the log: FULL survives power loss, NORMAL a crash."
    )
    commit_ms: float = Field(
        50.0, gt=0, le=10_000, description="Longest an entry waits for its batch commit."
    )
    commit_max: int = Field(1000, ge=1, description="Entries that trigger a commit at once.")
    retention_s: float = Field(
        7 * 86400.0,
        gt=0,
        description="Entries older than this go at compaction (unless not yet acknowledged).",
    )
    budget_mb: int = Field(
        1024,
        ge=1,
        description="Disk budget of the log; past it the oldest go, unacknowledged ones too (counted).",
    )
    compact_s: float = Field(60.0, gt=0, description="How often retention runs.")
    vector_dim: int = Field(384, ge=1, le=4096, description="Dimensions of long-term memory vectors.")
    ltm_max_items: int = Field(
        1_000_000, ge=1, description="Long-term memory items kept at most (least recently used go first)."
    )
    ltm_max_age_s: float = Field(
        365 * 86400.0, gt=0, description="Long-term memory items older than this go."
    )
    context_max_entries: int = Field(
        100_000, ge=1, description="Short-term context entries kept at most (least recently used go first)."
    )
    text_embeddings: bool = Field(
        True, description="Embed texts for long-term memory (ltm-add/ltm-search with text, embed)."
    )
    embedder_dir: str = Field(
        "",
        description="A sentence-transformers BERT folder to embed with; empty: the bundled all-MiniLM-L6-v2.",
    )
    embedder_cache: str = Field(
        "", description="Where the encoder's ONNX file is built once; empty: {data_dir}/memory/embedder."
    )
    embed_threads: int = Field(1, ge=1, le=64, description="onnxruntime threads of the text encoder.")
    sync: Literal["auto", "uplink", "always", "off"] = Field(
        "auto",
        description="Replicate long-term memory and log summaries to the cloud: auto (when "
        "uplink.cloud is set) and uplink send while the uplink bridge reports itself connected; "
        "always sends regardless; off keeps nothing for the cloud.",
    )
    sync_batch: int = Field(200, ge=1, le=10_000, description="Sync records per message up.")
    sync_window: int = Field(
        2000, ge=1, description="Sync records sent but not yet acknowledged by the cloud, at most."
    )
    sync_resend_s: float = Field(
        10.0, gt=0, description="No acknowledgement for this long: resend from the last acknowledged."
    )
    summary_s: float = Field(60.0, gt=0, description="How often the log is summarised for the cloud.")


class BrokerSettings(Section):
    """The Mosquitto that ``outpost up`` starts when no external broker is given."""

    binary: str = Field("mosquitto", description="Mosquitto executable.")
    port: int = Field(0, ge=0, le=65535, description="Port to listen on; 0 picks a free one.")
    max_queued_messages: int = Field(1_000_000, ge=0, description="Per-client queue (0 = unlimited).")
    max_inflight_messages: int = Field(
        1000, ge=0, description="Per-client unacknowledged QoS 1 deliveries (0 = unlimited)."
    )
    message_size_limit: int = Field(8_000_000, ge=0, description="Largest message the broker accepts.")
    autosave_interval_s: int = Field(60, ge=1, description="Persistence autosave interval.")


_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})")
_CONF_SAFE_RE = re.compile(r"[!-~]{1,256}")
"""What may go into a line of a generated Mosquitto config: printable ASCII, no spaces (Mosquitto
splits its lines on them) and no line breaks (a value must never become a config line of its own)."""


def parse_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), the host a name or an IPv4 address; ValueError saying what is
    wrong otherwise. Strict, because it also goes into the broker's config (the uplink bridge)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be HOST:PORT with a port 1-65535, got {value[:100]!r}")
    if _HOST_RE.fullmatch(host) is None:
        raise ValueError(
            f"the host must be a name or an IPv4 address (letters, digits, '.', '-'), got {host[:100]!r}"
        )
    return host, int(port)


def conf_safe(value: str, what: str) -> str:
    """``value`` if it can be written into a Mosquitto config line as one token; ValueError otherwise."""
    if _CONF_SAFE_RE.fullmatch(value) is None:
        raise ValueError(f"{what} must be 1-256 printable characters without spaces or line breaks")
    return value


class UplinkSettings(Section):
    """The store-and-forward bridge from the edge broker to the cloud broker (docs/memory.md#sync).

    ``outpost up`` writes it into the Mosquitto it starts: ``{root}/up/#`` goes out and
    ``{root}/down/#`` comes in, at QoS 1 with a persistent session, so the edge broker queues what
    goes up while the link is down. An external broker needs the same bridge in its own config.
    """

    cloud: str = Field("", description="HOST:PORT of the cloud broker; empty: no uplink.")
    username: str | None = Field(None, description="User on the cloud broker.")
    password: SecretStr | None = Field(None, description="Its password; never logged or published.")

    @field_validator("cloud")
    @classmethod
    def _host_port(cls, v: str) -> str:
        if v:
            parse_host_port(v)
        return v

    @field_validator("username")
    @classmethod
    def _username(cls, v: str | None) -> str | None:
        return None if v is None else conf_safe(v, "the username")

    @field_validator("password")
    @classmethod
    def _password(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            conf_safe(v.get_secret_value(), "the password")  # the message never shows it
        return v


class TelemetrySettings(Section):
    metrics_interval_s: float = Field(5.0, gt=0, description="How often services publish metrics.")


class OutpostSettings(BaseSettings):
    """The root of every setting. ``site`` and ``data_dir`` names are fixed by DESIGN.md."""

    model_config = SettingsConfigDict(
        env_prefix="OUTPOST_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
        hide_input_in_errors=True,
    )

    site: str = Field("site1", description="Site id, the third topic level.")
    prefix: str = Field("outpost", description="Topic prefix, so installations can share a broker.")
    data_dir: Path = Field(Path(".outpost"), description="Durable state lives here.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_json: bool = Field(False, description="Log one JSON object per line instead of text.")
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    uplink: UplinkSettings = Field(default_factory=UplinkSettings)

    @field_validator("site", "prefix")
    @classmethod
    def _segment(cls, v: str) -> str:
        if SEGMENT_RE.fullmatch(v) is None:
            raise ValueError("must match [A-Za-z0-9_-]{1,64}")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_path()
        if path is not None:
            sources.append(_SiteFileSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @property
    def topics(self) -> Topics:
        return Topics(site=self.site, prefix=self.prefix)

    def config_hash(self) -> str:
        """A short hash of the effective settings, published in service status so operators can
        tell which config a service runs. Secrets are masked before hashing, so it leaks nothing."""
        data = self.model_dump(mode="json")
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict safe to log or print: secrets are masked by SecretStr."""
        return self.model_dump(mode="python")


class _SiteFileSource(YamlConfigSettingsSource):
    """The site file: a YAML syntax error or a document that is not a mapping is a ConfigError."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            data = super()._read_file(file_path)
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse site file {file_path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"site file {file_path} must hold a mapping of settings, not a {type(data).__name__}"
            )
        # a section given as a scalar would be merged away silently by an OUTPOST_{SECTION}__*
        # variable (the environment wins key by key): refuse it here, whatever the environment says
        for key, value in data.items():
            field = OutpostSettings.model_fields.get(str(key))
            kind = field.annotation if field is not None else None
            if isinstance(kind, type) and issubclass(kind, BaseModel) and not isinstance(value, dict):
                raise ConfigError(
                    f"site file {file_path}: {key} must be a mapping of settings, not {type(value).__name__} "
                    f"{str(value)[:40]!r}"
                )
        return data


def _config_path() -> Path | None:
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"{CONFIG_ENV} points to {path}, which is not a file")
        return path
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def _known_env_names() -> set[str]:
    return {f"OUTPOST_{name}".upper() for name in OutpostSettings.model_fields} | {CONFIG_ENV}


def _check_env() -> None:
    """pydantic-settings ignores OUTPOST_* variables that name no setting; a typo there would
    silently fall back to a default, so it is an error here."""
    known = _known_env_names()
    for name in os.environ:
        # pydantic-settings matches names case-insensitively, so outpost_foo is checked too
        if not name.upper().startswith("OUTPOST_"):
            continue
        top = name.upper().split("__", 1)[0]
        if top not in known:
            raise ConfigError(f"unknown setting in environment: {name}")


def load_settings(**overrides: Any) -> OutpostSettings:
    """Load and check settings; any problem is one ConfigError with every bad field named."""
    _check_env()
    try:
        return OutpostSettings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(root)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("invalid settings:\n" + "\n".join(lines)) from None
    except (OSError, ValueError) as exc:  # YAML syntax errors surface as ValueError subclasses
        raise ConfigError(f"cannot read settings: {exc}") from None
