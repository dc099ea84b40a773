"""The Grafana side of compose/: the dashboards load, every panel queries something, and what they
query exists in the telemetry catalog; the provisioning points Grafana at the InfluxDB 2 of the
compose file and at the dashboards' folder, with no secret written down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from outpost.services.telemetry.catalog import MEASUREMENTS
from tests.dashboards import (
    DASHBOARDS,
    DashboardError,
    dashboards,
    named,
    named_tags,
    panels,
    pipelines,
    queries,
    victoria_series,
)

COMPOSE = DASHBOARDS.parents[1]
PROVISIONING = COMPOSE / "grafana" / "provisioning"
DATASOURCE_UID = "outpost-influxdb"


def _yaml(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), path
    return doc


def test_the_four_dashboards_load_and_every_panel_has_a_query() -> None:
    docs = dashboards()
    titles = {d["title"] for d in docs.values()}
    assert titles == {
        "Outpost: site overview",
        "Outpost: one model",
        "Outpost: agents and escalations",
        "Outpost: uplink",
    }
    assert len({d["uid"] for d in docs.values()}) == 4
    for name, doc in docs.items():
        assert panels(doc), name
        for p in panels(doc):
            assert p["datasource"]["uid"] == DATASOURCE_UID, (name, p["title"])
            targets = p.get("targets", [])
            assert targets and all(t["query"].strip() for t in targets), (name, p["title"])
            assert all(t["datasource"]["uid"] == DATASOURCE_UID for t in targets), (name, p["title"])


def test_every_query_names_catalog_measurements_and_fields() -> None:
    pairs = named()
    assert len(pairs) >= 20  # the parser found the queries' series (not an empty pass)
    unknown = {
        pair: where
        for pair, where in pairs.items()
        if pair[0] not in MEASUREMENTS or pair[1] not in MEASUREMENTS[pair[0]].fields
    }
    assert not unknown, unknown
    assert "inference_latency_p99_ms" in victoria_series()


def test_every_tag_a_query_uses_is_one_the_measurement_has() -> None:
    for measurement, tags in named_tags().items():
        assert measurement in MEASUREMENTS, measurement
        assert tags <= {"site", *MEASUREMENTS[measurement].tags}, (measurement, tags)


def test_every_panel_is_filtered_by_the_site_variable() -> None:
    for name, doc in dashboards().items():
        variables = {v["name"] for v in doc["templating"]["list"]}
        assert "site" in variables, name
        for q in queries(name, doc):
            if not q.variable:
                assert 'r.site == "${site}"' in q.text, (name, q.where)


def test_the_model_dashboard_is_templated_on_model_and_version() -> None:
    doc = dashboards()["model.json"]
    assert {v["name"] for v in doc["templating"]["list"]} >= {"site", "model", "version"}
    for q in queries("model.json", doc):
        if not q.variable and "inference_latency" in q.text:
            assert 'r.model == "${model}"' in q.text and 'r.version == "${version}"' in q.text, q.where


@pytest.mark.parametrize(
    ("flux", "error"),
    [
        ('from(bucket: "b") |> filter(fn: (r) => r._measurement =~ /lat/ and r._field == "x")', "=~"),
        ('from(bucket: "b") |> filter(fn: (r) => r._measurement == "a" and r._field != "x")', "!="),
        ('from(bucket: "b") |> filter(fn: (r) => r._measurement == "a" or r._measurement == "b")', "one"),
        ('from(bucket: "b") |> filter(fn: (r) => r._field == "x")', "without a measurement"),
    ],
)
def test_the_parser_refuses_what_it_cannot_check(flux: str, error: str) -> None:
    with pytest.raises(DashboardError, match=error):
        pipelines(flux)


def test_the_parser_reads_each_pipeline_on_its_own() -> None:
    flux = (
        'a = from(bucket: v.defaultBucket) |> filter(fn: (r) => r["_measurement"] == "process" '
        'and r.service == "x") |> filter(fn: (r) => r._field == "cpu_pct" or r._field == "rss_mb")\n'
        'b = from(bucket: v.defaultBucket) |> filter(fn: (r) => r._measurement == "dlq")'
        ' |> filter(fn: (r) => r._field == "rate") |> group(columns: ["reason", "_field"])\n'
        "union(tables: [a, b])"
    )
    got = pipelines(flux)
    assert [(p.measurement, sorted(p.fields), sorted(p.tags)) for p in got] == [
        ("process", ["cpu_pct", "rss_mb"], ["service"]),
        ("dlq", ["rate"], ["reason"]),
    ]


def test_a_panel_without_a_query_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text('{"panels": [{"id": 1, "title": "empty", "type": "timeseries"}]}')
    with pytest.raises(DashboardError, match="has no query"):
        named(tmp_path)
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(DashboardError, match="not readable JSON"):
        named(tmp_path)


def test_the_datasource_is_influxdb_2_in_flux_with_its_secrets_from_the_environment() -> None:
    doc = _yaml(PROVISIONING / "datasources" / "influxdb.yaml")
    [ds] = doc["datasources"]
    assert ds["type"] == "influxdb" and ds["uid"] == DATASOURCE_UID
    assert ds["url"] == "http://influxdb:8086"
    assert ds["jsonData"]["version"] == "Flux"
    assert ds["jsonData"]["organization"] == "${INFLUX_ORG}"
    assert ds["jsonData"]["defaultBucket"] == "${INFLUX_BUCKET}"
    assert ds["secureJsonData"]["token"] == "${INFLUX_TOKEN}"


def test_the_dashboard_provider_reads_the_mounted_dashboards_folder() -> None:
    [provider] = _yaml(PROVISIONING / "dashboards" / "outpost.yaml")["providers"]
    assert provider["type"] == "file"
    compose = _yaml(COMPOSE / "compose.yaml")["services"]
    mounts = dict(m.split(":", 1) for m in compose["grafana"]["volumes"] if m.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"] + ":ro"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning:ro"
    assert (COMPOSE / "grafana" / "dashboards").resolve() == DASHBOARDS


def test_compose_runs_influxdb_2_and_gives_the_site_its_telemetry_settings() -> None:
    services = _yaml(COMPOSE / "compose.yaml")["services"]
    influx = services["influxdb"]
    assert influx["image"] == "influxdb:2"
    init = influx["environment"]
    for key in ("ORG", "BUCKET", "ADMIN_TOKEN"):
        assert init[f"DOCKER_INFLUXDB_INIT_{key}"].startswith("${"), key  # from the environment
    assert services["grafana"]["image"] == "grafana/grafana"
    env = services["outpost"]["environment"]
    assert env["OUTPOST_TELEMETRY__INFLUX__URL"] == "http://influxdb:8086"
    for key in ("ORG", "BUCKET", "TOKEN"):
        assert env[f"OUTPOST_TELEMETRY__INFLUX__{key}"].startswith("${"), key
    published = {name for name, s in services.items() if s.get("ports")}
    assert published == {"mosquitto", "outpost"}  # the broker and the status page (test_compose.py)


def test_the_sites_telemetry_variables_in_compose_are_settings_it_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every OUTPOST_* variable compose gives the site is read into the settings (a misspelt name
    would be refused or, worse, ignored); compose's ``${VAR:-default}`` as compose fills it."""
    import re

    from outpost.services.registry import OutpostSettings

    env = _yaml(COMPOSE / "compose.yaml")["services"]["outpost"]["environment"]
    filled = {
        k: re.sub(r"\$\{(\w+)(?::-([^}]*)|:\?[^}]*)?\}", lambda m: m.group(2) or f"from-{m.group(1)}", str(v))
        for k, v in env.items()
    }
    for k, v in filled.items():
        monkeypatch.setenv(k, v)
    t = OutpostSettings().telemetry
    assert t.influx.url == "http://influxdb:8086"
    assert (t.influx.org, t.influx.bucket) == ("outpost", "outpost")
    assert t.influx.token is not None and t.influx.token.get_secret_value() == "from-INFLUX_TOKEN"
    assert t.page.host == "0.0.0.0"  # the container's page is reached through its published port
