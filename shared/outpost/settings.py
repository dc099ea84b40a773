"""The core's settings and the machinery that loads every setting.

Precedence: defaults < the site file (``outpost.yaml``, path in ``OUTPOST_CONFIG``) < ``OUTPOST_*``
environment variables (nested with ``__``, e.g. ``OUTPOST_MQTT__PORT``) < explicit arguments.
Unknown keys and bad values are errors at start (:class:`outpost.errors.ConfigError`), never ignored.

Here are the sections the core itself uses (MQTT, the broker, the uplink, telemetry) and
:class:`CoreSettings`, the root a site's settings derive from. Each service's section lives in the
service's own folder (``outpost.services.{name}.settings``), and the composed root, ``OutpostSettings``
with one field per service, is built by the service registry (:mod:`outpost.services.registry`):
the core never imports a service. :func:`load_settings` loads whichever root it is given.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

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


class DiskSettings(Section):
    """The disk budget of the data folder (outpost.disk): warned in every service's status before
    the disk is full, so an operator can act while the site still writes."""

    warn_free_mb: int = Field(
        100, ge=0, description="Warn (health degraded) when less than this is free on the data folder's disk."
    )
    max_data_mb: int = Field(
        0, ge=0, description="Warn when the data folder holds more than this (0: no limit)."
    )
    check_s: float = Field(10.0, gt=0, description="How often free space and the folder's size are measured.")


class CoreSettings(BaseSettings):
    """The root of every setting the core uses. A site's settings class derives from it and adds one
    field per service section (the service registry's ``OutpostSettings``). ``site`` and
    ``data_dir`` names are fixed by docs/design.md."""

    model_config = SettingsConfigDict(
        env_prefix="OUTPOST_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
        hide_input_in_errors=True,
    )

    SERVICES: ClassVar[dict[str, str]] = {}
    """The services this settings class configures, name -> module run with ``python -m``, in the
    order they start; what :class:`outpost.stack.Stack` supervises. None in the core; the service
    registry's class names its own."""

    site: str = Field("site1", description="Site id, the third topic level.")
    prefix: str = Field("outpost", description="Topic prefix, so installations can share a broker.")
    data_dir: Path = Field(
        Path("~/.local/share/outpost"),
        validate_default=True,
        description="Durable state: one folder per site under sites/, owned by one `outpost up` at a time "
        "(docs/operations.md). Absolute by default, so every command finds it from any folder.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_json: bool = Field(False, description="Log one JSON object per line instead of text.")
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    disk: DiskSettings = Field(default_factory=DiskSettings)
    uplink: UplinkSettings = Field(default_factory=UplinkSettings)

    @field_validator("data_dir")
    @classmethod
    def _home(cls, v: Path) -> Path:
        return v.expanduser()

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

    def __init__(self, settings_cls: type[BaseSettings], yaml_file: Path) -> None:
        self._root = settings_cls  # the file is read while the base class initialises
        super().__init__(settings_cls, yaml_file=yaml_file)

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
            field = self._root.model_fields.get(str(key))
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


def _known_env_names(settings_cls: type[BaseSettings]) -> set[str]:
    return {f"OUTPOST_{name}".upper() for name in settings_cls.model_fields} | {CONFIG_ENV}


def _check_env(settings_cls: type[BaseSettings]) -> None:
    """pydantic-settings ignores OUTPOST_* variables that name no setting; a typo there would
    silently fall back to a default, so it is an error here."""
    known = _known_env_names(settings_cls)
    for name in os.environ:
        # pydantic-settings matches names case-insensitively, so outpost_foo is checked too
        if not name.upper().startswith("OUTPOST_"):
            continue
        top = name.upper().split("__", 1)[0]
        if top not in known:
            raise ConfigError(f"unknown setting in environment: {name}")


S = TypeVar("S", bound=CoreSettings)


def load_settings(settings_cls: type[S], /, **overrides: Any) -> S:
    """Load and check settings of ``settings_cls`` (:class:`CoreSettings` or a class composed from
    it, e.g. the service registry's ``OutpostSettings``, whose ``load_settings`` calls this); any
    problem is one ConfigError with every bad field named. A section ``settings_cls`` has no field
    for is an unknown key like any other, so a site's processes load the composed class."""
    _check_env(settings_cls)
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(root)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("invalid settings:\n" + "\n".join(lines)) from None
    except (OSError, ValueError) as exc:  # YAML syntax errors surface as ValueError subclasses
        raise ConfigError(f"cannot read settings: {exc}") from None
