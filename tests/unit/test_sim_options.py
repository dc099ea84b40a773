"""Simulator plumbing without a broker: options, pacing, churn, the process plan, the report."""

from __future__ import annotations

import io
import math
import random
from collections import Counter

import orjson
import pytest
from pydantic import SecretStr, ValidationError
from rich.console import Console

from outpost.services.registry import OutpostSettings
from outpost.sim import SimOptions, SimReport
from outpost.sim.churn import Churn
from outpost.sim.pacing import Pacer
from outpost.sim.report import ProfileCounts, WorkerReport, merge, render
from outpost.sim.runner import plan


def test_options_defaults_and_host_port() -> None:
    o = SimOptions(broker="127.0.0.1:1884")
    assert (o.host, o.port) == ("127.0.0.1", 1884)
    assert o.processes >= 1 and o.batch == 1 and o.qos == 0 and o.prefix == "outpost"


@pytest.mark.parametrize(
    "bad",
    [
        {"broker": "localhost"},
        {"broker": "127.0.0.1:0"},
        {"broker": "127.0.0.1:http"},
        {"site": "a/b"},
        {"prefix": "#"},
        {"devices": 0},
        {"bad_ratio": 1.5},
        {"qos": 2},
        {"batch": 0},
        {"rate": -1},
        {"bad_kinds": ["no_such_kind"]},
        {"bad_kinds": []},
        {"surprise": 1},
    ],
)
def test_options_refuse_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SimOptions.model_validate(bad)


def test_options_from_settings_never_show_the_password() -> None:
    s = OutpostSettings.model_validate({"site": "shop7"})
    s.mqtt.port = 1999
    s.mqtt.username = "sim"
    s.mqtt.password = SecretStr("hunter2")
    o = SimOptions.from_settings(s, devices=3)
    assert (o.broker, o.site, o.username, o.devices) == ("127.0.0.1:1999", "shop7", "sim", 3)
    assert o.password is not None and o.password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(o) and "hunter2" not in o.model_dump_json()


def test_pacer_spaces_items_from_a_fixed_start() -> None:
    p = Pacer(1000.0, start=10.0)
    assert p.wait_s(0, 10.0) == 0.0
    assert p.wait_s(100, 10.0) == pytest.approx(0.1)
    assert p.wait_s(100, 10.0995) == 0.0  # within the slack: send now
    assert p.wait_s(100, 10.5) == 0.0  # late: catch up, do not wait
    assert Pacer(0.0, start=0.0).wait_s(10**9, 0.0) == 0.0  # flat out


def test_churn_off_never_drops_and_on_is_roughly_poisson() -> None:
    assert Churn(random.Random(1), 0.0).next_drop_in() == math.inf
    c = Churn(random.Random(1), 60.0, offline_s=(0.5, 1.0))
    gaps = [c.next_drop_in() for _ in range(5000)]
    assert 0.9 < sum(gaps) / len(gaps) < 1.1  # 60 a minute: one a second on average
    assert all(0.5 <= c.offline_for() <= 1.0 for _ in range(100))
    with pytest.raises(ValueError):
        Churn(random.Random(1), -1.0)


def test_plan_deals_devices_and_splits_rate_and_quota() -> None:
    o = SimOptions(devices=10, processes=3, rate=1000.0, readings=1001)
    work = plan(o)
    assert [len(specs) for specs, _, _ in work] == [4, 3, 3]
    assert sorted(s.index for specs, _, _ in work for s in specs) == list(range(10))
    assert sum(rate for _, rate, _ in work) == pytest.approx(1000.0)
    assert sum(q or 0 for _, _, q in work) == 1001
    assert all(q is None for _, _, q in plan(SimOptions(devices=4, processes=2)))
    assert len(plan(SimOptions(devices=2, processes=8))) == 2  # never more processes than devices


def test_merge_adds_up_and_render_prints_it() -> None:
    a = WorkerReport(index=1, devices=2, readings=10, messages=4, bad=Counter({"nan": 2}), drops=1)
    a.per_profile["fridge"] = ProfileCounts(devices=2, readings=10, messages=4, bad=2, anomalies=1)
    a.anomalies["door_left_open"] = 1
    b = WorkerReport(index=0, devices=1, readings=5, messages=5, bad=Counter({"nan": 1, "not_json": 1}))
    b.per_profile["fridge"] = ProfileCounts(devices=1, readings=5, messages=5, bad=2)
    r = merge([a, b], elapsed_s=2.0, scenario="retail", seed=3, batch=1, qos=0)
    assert (r.sent_readings, r.sent_messages, r.bad_total, r.offered) == (15, 9, 4, 19)
    assert r.bad_payloads == {"nan": 3, "not_json": 1}
    assert r.per_profile["fridge"].devices == 3 and r.per_profile["fridge"].readings == 15
    assert r.rate == pytest.approx(9.5) and r.devices == 3 and r.drops == 1
    assert SimReport.model_validate(orjson.loads(r.model_dump_json())) == r
    out = io.StringIO()
    render(r, Console(file=out, width=120))
    text = out.getvalue()
    assert "readings sent" in text and "fridge" in text and "not_json" in text and "door_left_open" in text
