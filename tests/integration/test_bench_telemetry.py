"""Smoke test of ``outpost bench telemetry``: a short run with the whole site, the simulator's retail
fleet and two real VictoriaMetrics. It checks that the benchmark counts (every reading seen, every
raw line stored, the bytes and windows found, the p99 compared), not the figures themselves."""

from __future__ import annotations

import orjson
import pytest

from outpost.benchmarks.telemetry import TelemetryBenchOptions, run_telemetry_bench
from tests.conftest import outpost

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_telemetry_bench_counts_both_sides() -> None:
    o = TelemetryBenchOptions.make(quick=True, devices=10, rate=100.0, duration_s=5.0, rollup_s=2.0)
    result = run_telemetry_bench(o)
    orjson.dumps(result)  # the --json form is this dict
    sent = result["sim"]["sent_readings"]
    assert sent > 0 and result["events"] == sent
    raw = result["raw"]
    assert raw["lines"] == raw["points_stored"] == sent and raw["errors"] == {}
    assert raw["wire_bytes"] >= raw["line_bytes"] > 0  # HTTP on top of the lines
    offline = result["rollups"]["line_protocol"]
    assert offline["windows"] >= 1 and offline["bytes"] > 0 and offline["batches_refused"] == 0
    if result["telemetry_service_ran"]:
        written = result["rollups"]["written"]
        assert written["windows"] >= 1 and result["rollups"]["wire_bytes"] > 0
        assert "process_rss_mb" in written["series_names"]
    acc = result["p99_accuracy"]
    assert acc["series_windows"] > 0 and acc["counts_agree"] is True
    assert acc["samples"] == 2 * sent  # each event: its device class's series and the series of all
    s = result["summary"]
    assert s["raw_over_rollups"] is not None and s["raw_over_rollups"] > 0
    assert s["p99_error_pct"] is not None
    assert set(s["targets_met"]) == {"bytes", "p99"}


def test_cli_json_is_one_object_on_the_last_line() -> None:
    p = outpost(
        "bench", "telemetry", "--quick", "--devices", "5", "--rate", "50", "--duration", "3", "--json"
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = orjson.loads(p.stdout.strip().splitlines()[-1])
    assert result["bench"] == "telemetry"
    assert "p99_error_pct" in result["summary"] and "raw_over_rollups" in result["summary"]
