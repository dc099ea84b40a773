"""Settings: defaults < site file (OUTPOST_CONFIG) < OUTPOST_* env (nested with __) < arguments;
unknown keys and bad values are ConfigError naming the field; secrets never show."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from outpost.errors import ConfigError
from outpost.services.registry import REGISTRY, OutpostSettings, Service, check_registry, load_settings
from outpost.settings import CoreSettings, Section
from outpost.settings import load_settings as core_load_settings

SECRET = "hunter2-Sup3rSecret"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No OUTPOST_* variables from the caller, and no outpost.yaml in the working directory."""
    for name in list(os.environ):
        if name.upper().startswith("OUTPOST_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def site_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    def write(text: str) -> Path:
        path = tmp_path / "site.yaml"
        path.write_text(text)
        monkeypatch.setenv("OUTPOST_CONFIG", str(path))
        return path

    return write


def test_defaults() -> None:
    s = load_settings()
    assert s.site == "site1"
    assert s.prefix == "outpost"
    assert s.data_dir == Path("~/.local/share/outpost").expanduser()  # absolute: the same from any folder
    assert s.mqtt.host == "127.0.0.1"
    assert s.mqtt.port == 1883
    assert s.mqtt.password is None
    assert s.ingest.qos == 1
    assert s.ingest.max_batch == 10_000
    assert s.topics.root == "outpost/v1/site1"


def test_site_file_overrides_defaults(site_file: Callable[[str], Path]) -> None:
    site_file("site: yamlsite\nmqtt:\n  port: 1999\ningest:\n  max_batch: 50\n")
    s = load_settings()
    assert (s.site, s.mqtt.port, s.ingest.max_batch) == ("yamlsite", 1999, 50)
    assert s.mqtt.host == "127.0.0.1"  # untouched nested default survives


def test_default_site_file_in_working_directory(tmp_path: Path) -> None:
    (tmp_path / "outpost.yaml").write_text("site: fromcwd\n")
    assert load_settings().site == "fromcwd"


def test_env_overrides_site_file(site_file: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    site_file("site: yamlsite\nmqtt:\n  port: 1999\n  host: 127.0.0.2\n")
    monkeypatch.setenv("OUTPOST_SITE", "envsite")
    monkeypatch.setenv("OUTPOST_MQTT__PORT", "2000")
    s = load_settings()
    assert s.site == "envsite"
    assert s.mqtt.port == 2000
    assert s.mqtt.host == "127.0.0.2"  # nested keys merge: env overrides one, the file keeps the other


def test_arguments_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTPOST_SITE", "envsite")
    assert load_settings(site="argsite").site == "argsite"


@pytest.mark.parametrize(
    ("name", "value", "check"),
    [
        ("OUTPOST_DATA_DIR", "/var/lib/outpost", lambda s: s.data_dir == Path("/var/lib/outpost")),
        ("OUTPOST_MQTT__HOST", "127.0.0.9", lambda s: s.mqtt.host == "127.0.0.9"),
        ("OUTPOST_MQTT__USERNAME", "svc", lambda s: s.mqtt.username == "svc"),
        ("OUTPOST_INGEST__QOS", "1", lambda s: s.ingest.qos == 1),
        ("OUTPOST_INGEST__QOS", "0", lambda s: s.ingest.qos == 0),
        ("OUTPOST_INGEST__DLQ_QOS", "0", lambda s: s.ingest.dlq_qos == 0),
        ("OUTPOST_INGEST__MAX_PAYLOAD_BYTES", "4096", lambda s: s.ingest.max_payload_bytes == 4096),
        ("OUTPOST_INGEST__MAX_BATCH", "50", lambda s: s.ingest.max_batch == 50),
        ("OUTPOST_TELEMETRY__METRICS_INTERVAL_S", "0.5", lambda s: s.telemetry.metrics_interval_s == 0.5),
        ("OUTPOST_LOG_JSON", "true", lambda s: s.log_json is True),
    ],
)
def test_fixed_env_names(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, check: Callable[[OutpostSettings], bool]
) -> None:
    monkeypatch.setenv(name, value)
    assert check(load_settings())


@pytest.mark.parametrize(
    "name", ["OUTPOST_BOGUS", "OUTPOST_MQTT_PORT", "OUTPOST_MQTT__BOGUS", "OUTPOST_INGEST__MAXBATCH"]
)
def test_unknown_env_is_an_error(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "1")
    with pytest.raises(ConfigError):
        load_settings()


def test_unknown_lowercase_env_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # pydantic-settings reads OUTPOST_* case-insensitively (outpost_site works), so a lowercase
    # typo must be caught too rather than silently ignored.
    monkeypatch.setenv("outpost_site", "lower")
    assert load_settings().site == "lower"
    monkeypatch.setenv("outpost_bogus", "1")
    with pytest.raises(ConfigError, match="outpost_bogus"):
        load_settings()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("bogus: 1\n", "bogus"),
        ("mqtt:\n  bogus: 1\n", "mqtt.bogus"),
        ("ingest:\n  max_batchh: 5\n", "ingest.max_batchh"),
    ],
)
def test_unknown_yaml_key_is_an_error(site_file: Callable[[str], Path], text: str, field: str) -> None:
    site_file(text)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("OUTPOST_MQTT__PORT", "abc", "mqtt.port"),
        ("OUTPOST_MQTT__PORT", "70000", "mqtt.port"),
        ("OUTPOST_MQTT__PORT", "0", "mqtt.port"),
        ("OUTPOST_MQTT__KEEPALIVE", "1", "mqtt.keepalive"),
        ("OUTPOST_INGEST__QOS", "2", "ingest.qos"),
        ("OUTPOST_INGEST__MAX_PAYLOAD_BYTES", "10", "ingest.max_payload_bytes"),
        ("OUTPOST_INGEST__MAX_BATCH", "0", "ingest.max_batch"),
        ("OUTPOST_SITE", "bad/site", "site"),
        ("OUTPOST_SITE", "+", "site"),
        ("OUTPOST_PREFIX", "x" * 65, "prefix"),
        ("OUTPOST_LOG_LEVEL", "LOUD", "log_level"),
    ],
)
def test_bad_env_value_names_the_field(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, field: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert f"{field}:" in str(exc.value)


def test_bad_nested_json_env_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTPOST_MQTT", "{not json")
    with pytest.raises(ConfigError, match="mqtt"):
        load_settings()


def test_every_bad_field_is_named(site_file: Callable[[str], Path]) -> None:
    site_file("mqtt:\n  port: -1\ningest:\n  max_batch: 0\n  flush_max: 0\n")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    for field in ("mqtt.port", "ingest.max_batch", "ingest.flush_max"):
        assert field in str(exc.value)


def test_bad_yaml_value_names_the_field(site_file: Callable[[str], Path]) -> None:
    site_file("ingest:\n  qos: 5\n")
    with pytest.raises(ConfigError, match=r"ingest\.qos"):
        load_settings()


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("site: [unclosed\n", id="syntax-error"),
        pytest.param("mqtt:\n  port: 1\n   host: x\n", id="bad-indent"),
        pytest.param("- 1\n- 2\n", id="top-level-list"),
        pytest.param("just a string\n", id="top-level-scalar"),
        pytest.param("mqtt: 5\n", id="section-not-a-mapping"),
    ],
)
def test_malformed_site_file_is_a_config_error(site_file: Callable[[str], Path], text: str) -> None:
    site_file(text)
    with pytest.raises(ConfigError):
        load_settings()


def test_empty_site_file_means_defaults(site_file: Callable[[str], Path]) -> None:
    site_file("")
    assert load_settings().site == "site1"


def test_missing_site_file_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OUTPOST_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not a file"):
        load_settings()


def test_assignment_is_validated() -> None:
    s = load_settings()
    with pytest.raises(ValueError, match="port"):
        s.mqtt.port = 0
    with pytest.raises(ValueError, match="unknown"):
        s.mqtt.unknown = 1  # type: ignore[attr-defined]


def _all_texts(s: OutpostSettings) -> list[str]:
    red = s.redacted()
    return [
        repr(s),
        str(s),
        repr(s.mqtt),
        str(s.mqtt),
        repr(red),
        str(red),
        orjson.dumps(s.model_dump(mode="json")).decode(),
        s.model_dump_json(),
        s.config_hash(),
    ]


def test_secret_from_env_never_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTPOST_MQTT__USERNAME", "svc")
    monkeypatch.setenv("OUTPOST_MQTT__PASSWORD", SECRET)
    s = load_settings()
    assert s.mqtt.password is not None
    assert s.mqtt.password.get_secret_value() == SECRET
    for text in _all_texts(s):
        assert SECRET not in text


def test_secret_from_site_file_never_shows(site_file: Callable[[str], Path]) -> None:
    site_file(f"mqtt:\n  username: svc\n  password: {SECRET}\n")
    s = load_settings()
    assert s.mqtt.password is not None
    assert s.mqtt.password.get_secret_value() == SECRET
    for text in _all_texts(s):
        assert SECRET not in text


def test_secret_not_in_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTPOST_MQTT__PASSWORD", SECRET)
    monkeypatch.setenv("OUTPOST_MQTT__PORT", "nope")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert SECRET not in str(exc.value)


def test_config_hash_is_stable_and_tracks_settings() -> None:
    a, b = load_settings(), load_settings()
    assert a.config_hash() == b.config_hash()
    assert len(a.config_hash()) == 12
    assert load_settings(site="other").config_hash() != a.config_hash()


@pytest.mark.parametrize("env", [{}, {"OUTPOST_INFERENCE__MAX_BATCH": "5"}])
def test_a_section_given_as_a_scalar_is_refused_even_beside_env(
    site_file: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    """The environment merges key by key into the site file's sections: without this check
    ``inference: nope`` was silently replaced by the variable's section."""
    site_file("inference: nope\n")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match="inference must be a mapping of settings, not str 'nope'"):
        load_settings()


def test_the_registry_composes_the_settings_and_the_services_to_run() -> None:
    """One row per service: its section is a field of OutpostSettings and its module is what
    ``outpost up`` supervises, in the table's order; the core alone knows no service."""
    names = [s.name for s in REGISTRY]
    assert names == ["ingest", "inference", "memory", "agents", "connectors", "telemetry", "uplink"]
    for row in REGISTRY:
        assert OutpostSettings.model_fields[row.name].annotation is row.settings
        core_field = CoreSettings.model_fields.get(row.name)
        if core_field is not None:  # telemetry, uplink: the core's section widened by the service's own
            assert row.settings is not None and isinstance(core_field.annotation, type)
            assert issubclass(row.settings, core_field.annotation)
    assert {s.name: s.module for s in REGISTRY} == OutpostSettings.SERVICES
    assert list(OutpostSettings.SERVICES) == [s.name for s in REGISTRY]
    assert CoreSettings.SERVICES == {}


def test_a_registry_row_without_its_field_is_refused() -> None:
    """The table and the typed fields are checked to agree when the registry is imported."""
    extra = (*REGISTRY, Service("extra", Section, "outpost.services.extra"))
    with pytest.raises(TypeError, match="extra"):
        check_registry(extra, OutpostSettings)
    with pytest.raises(TypeError, match="a name twice"):
        check_registry((*REGISTRY, REGISTRY[0]), OutpostSettings)
    check_registry(REGISTRY, OutpostSettings)


def test_core_settings_load_alone_and_refuse_a_service_section(site_file: Callable[[str], Path]) -> None:
    """The core loads its own root without a service; a service's section is a key only the
    composed class knows, so the core refuses it like any unknown key."""
    s = core_load_settings(CoreSettings, site="coresite")
    assert type(s) is CoreSettings and s.site == "coresite"
    site_file("ingest:\n  max_batch: 5\n")
    with pytest.raises(ConfigError, match="ingest"):
        core_load_settings(CoreSettings)
    assert load_settings().ingest.max_batch == 5
