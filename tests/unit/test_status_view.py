"""``outpost status``'s view at 80 columns: every problem, reason and count in full, and "no
metrics yet" where a service has not published any."""

from __future__ import annotations

from typing import Any

import pytest

from outpost.cli.stack import print_status


def _service(**kw: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "state": "online",
        "health": "ok",
        "problems": [],
        "reason": None,
        "pid": 4242,
        "messages": 123_456,
        "messages_per_s": 2000.4,
        "messages_per_s_since_start": 1800.0,
        "rejected": 1601,
        "metrics": {"counters": {}},
    }
    return s | kw


def test_status_fits_80_columns_and_cuts_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    problem = (
        "model fridge-anomaly@1.1.0 cannot load: the file's sha256 does not match its manifest (3f2a...)"
    )
    report = {
        "site": "shop12",
        "broker": "127.0.0.1:41234",
        "where": {"broker_from": "the run file of outpost up PID 77"},
        "services": {
            "inference": _service(health="degraded", problems=[problem], messages_per_s=None),
            "ingest": _service(),
            "memory": _service(metrics=None, messages=None, rejected=None),
        },
        "dlq": {"ingest": {"duplicate": 1601, "timestamp_too_far_in_the_past": 12, "bad_identifier": 3}},
        "uplink": {
            "up": False,
            "backlog": {"ltm": 12, "log": 3_000},
            "age_s": {"ltm": 95.4, "log": 3_700.0},
        },
    }
    print_status(report)
    out = capsys.readouterr().out
    assert all(len(line) <= 80 for line in out.splitlines()), out
    flat = " ".join(out.split())
    assert problem in flat and "degraded" in flat and "…" not in out
    assert "no metrics yet" in flat and "~1,800 avg" in flat and "2,000" in flat
    for reason, n in (
        ("duplicate", "1,601"),
        ("timestamp_too_far_in_the_past", "12"),
        ("bad_identifier", "3"),
    ):
        assert reason in out and n in out
    assert (
        "uplink: DOWN; backlog not yet in the cloud: ltm 12 (oldest 95 s), log 3,000 (oldest 3,700 s)" in flat
    )
