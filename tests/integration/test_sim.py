"""The simulator against a real Mosquitto (and a real ingest): what it reports is what arrives."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from outpost.cli.main import app
from outpost.services.registry import OutpostSettings
from outpost.sim import EXPECTED_REASON, BadKind, SimOptions, SimReport, run
from outpost.topics import Topics

pytestmark = pytest.mark.integration


def _readings(messages: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _, payload in messages:
        doc = orjson.loads(payload)
        out.extend(doc if isinstance(doc, list) else [doc])
    return out


def _options(settings: OutpostSettings, **kw: Any) -> SimOptions:
    base: dict[str, Any] = {"rate": 0, "duration": 20, "churn": 0, "processes": 1}
    base.update(kw)
    return SimOptions.from_settings(settings, **base)


def test_every_reported_reading_arrives(settings: OutpostSettings, collect: Callable[..., Any]) -> None:
    c = collect(settings.topics.all_telemetry)
    report = run(_options(settings, devices=12, readings=3000, batch=7))
    assert report.sent_readings == 3000 and report.bad_total == 0
    assert c.wait_for(lambda c: len(c.messages) >= report.sent_messages)
    got = _readings(c.messages)
    assert len(c.messages) == report.sent_messages
    assert len(got) == report.sent_readings
    assert all(len(doc) <= 7 for doc in (orjson.loads(p) for _, p in c.messages))
    by_device = Counter(r["device"] for r in got)
    assert len(by_device) == 12
    for topic, payload in c.messages:  # each message on its own device's topic
        device = settings.topics.device_of(topic)
        assert {r["device"] for r in _readings([(topic, payload)])} == {device}
    per_profile = sum(p.readings for p in report.per_profile.values())
    assert per_profile == report.sent_readings


def test_processes_qos1_and_churn_lose_nothing_and_fire_wills(
    settings: OutpostSettings, collect: Callable[..., Any]
) -> None:
    telemetry = collect(settings.topics.all_telemetry)
    status = collect(settings.topics.all_device_status)
    opts = _options(settings, devices=6, processes=2, qos=1, batch=10, rate=1500, readings=3000, churn=120)
    report = run(opts)
    assert report.processes == 2 and report.devices == 6
    assert report.sent_readings == 3000 and report.unacked == 0 and report.publish_errors == 0
    assert telemetry.wait_for(lambda c: len(c.messages) >= report.sent_messages)
    assert len(_readings(telemetry.messages)) == report.sent_readings
    assert report.drops > 0  # ~24 expected; zero has a chance of e**-24

    def statuses() -> list[dict[str, Any]]:
        return [orjson.loads(p) for _, p in status.messages]

    # every connect said online; every abrupt drop fired the last will; every device ended offline
    connects = 6 + report.reconnects
    assert status.wait_for(
        lambda _: (
            sum(s["state"] == "online" for s in statuses()) >= connects
            and sum(s.get("reason") == "connection lost" for s in statuses()) >= report.drops
        )
    )
    assert sum(s["state"] == "online" for s in statuses()) == connects
    assert sum(s.get("reason") == "connection lost" for s in statuses()) == report.drops
    retained = collect(settings.topics.all_device_status)
    assert retained.wait_for(lambda c: len({t for t, _ in c.messages}) == 6)
    assert all(orjson.loads(p)["state"] == "offline" for _, p in retained.messages)


def test_ingest_turns_good_readings_into_events_and_bad_ones_into_dead_letters(
    settings: OutpostSettings, collect: Callable[..., Any], ingest: Any
) -> None:
    events = collect(settings.topics.all_events)
    dlq = collect(settings.topics.all_dlq)
    report = run(_options(settings, devices=8, readings=2400, batch=6, bad_ratio=0.2, seed=5))
    assert report.bad_total > 300 and set(report.bad_payloads) == {str(k) for k in BadKind}
    assert events.wait_for(lambda c: len(c.events()) >= report.sent_readings, 30)
    assert dlq.wait_for(lambda c: len(c.messages) >= report.bad_total, 30)
    ids = [e["id"] for e in events.events()]
    assert len(ids) == len(set(ids)) == report.sent_readings
    reasons = Counter(d["reason"] for d in dlq.json())
    expected = Counter({EXPECTED_REASON[BadKind(k)]: n for k, n in report.bad_payloads.items()})
    assert reasons == expected


def test_same_seed_same_values_whatever_the_process_layout(
    settings: OutpostSettings, collect: Callable[..., Any]
) -> None:
    runs: list[dict[str, list[tuple[int, str, float, str]]]] = []
    for site, processes in (("seedA", 1), ("seedB", 2)):
        c = collect(Topics(site=site, prefix=settings.prefix).all_telemetry)
        report = run(
            _options(settings, site=site, devices=6, readings=900, batch=3, seed=99, processes=processes)
        )
        assert c.wait_for(lambda c, n=report.sent_messages: len(c.messages) >= n)
        seqs: dict[str, list[tuple[int, str, float, str]]] = {}
        for r in _readings(c.messages):
            seqs.setdefault(r["device"], []).append((r["seq"], r["metric"], r["value"], r["unit"]))
        runs.append({d: sorted(v) for d, v in seqs.items()})
    a, b = runs
    assert a.keys() == b.keys()
    for device in a:
        n = min(len(a[device]), len(b[device]))
        assert n > 0
        assert a[device][:n] == b[device][:n]


def test_cli_prints_one_json_report_last_and_never_the_password(settings: OutpostSettings) -> None:
    result = CliRunner().invoke(
        app,
        [
            "sim",
            "--broker",
            f"127.0.0.1:{settings.mqtt.port}",
            "--site",
            settings.site,
            "--devices",
            "4",
            "--readings",
            "200",
            "--rate",
            "0",
            "--processes",
            "1",
            "--bad-ratio",
            "0.1",
            "--bad-kinds",
            "nan,not_json",
            "--username",
            "sim",
            "--password",
            "s3cret-pw",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "s3cret-pw" not in result.output
    report = SimReport.model_validate_json(result.stdout.strip().splitlines()[-1])
    assert report.offered == 200
    assert report.broker == f"127.0.0.1:{settings.mqtt.port}" and report.site == settings.site
    assert set(report.bad_payloads) <= {"nan", "not_json"}

    table = CliRunner().invoke(
        app,
        [
            "sim",
            "--broker",
            f"127.0.0.1:{settings.mqtt.port}",
            "--devices",
            "2",
            "--readings",
            "50",
            "--processes",
            "1",
            "--password",
            "s3cret-pw",
        ],
    )
    assert table.exit_code == 0, table.output
    assert "readings sent" in table.stdout and "s3cret-pw" not in table.output


def test_unreachable_broker_is_a_clear_error(settings: OutpostSettings) -> None:
    from outpost.broker import free_port
    from outpost.errors import BrokerError

    with pytest.raises(BrokerError, match="cannot connect"):
        run(_options(settings, broker=f"127.0.0.1:{free_port()}", devices=2, readings=10))
    with pytest.raises(BrokerError):
        run(_options(settings, broker=f"127.0.0.1:{free_port()}", devices=4, readings=10, processes=2))


def test_credentials_are_used_and_a_refusal_is_a_clear_error() -> None:
    from outpost.broker import Mosquitto
    from outpost.errors import BrokerError

    # Not under tmp_path: pytest's temp root is mode 0700, and a Mosquitto started as root runs as
    # the user ``mosquitto``, which could not read its password file there.
    workdir = Path(tempfile.mkdtemp(prefix="outpost-sim-auth-"))
    try:
        with Mosquitto(workdir, users={"sim": "right-pw"}) as m:
            base = {
                "broker": m.address,
                "site": "auth",
                "devices": 3,
                "readings": 30,
                "rate": 0,
                "processes": 1,
            }
            ok = run(SimOptions.model_validate({**base, "username": "sim", "password": "right-pw"}))
            assert ok.offered == 30
            with pytest.raises(BrokerError, match="refused") as err:
                run(SimOptions.model_validate({**base, "username": "sim", "password": "wrong-pw"}))
            assert "wrong-pw" not in str(err.value)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
