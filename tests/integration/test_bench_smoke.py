"""The benchmark harnesses run end to end and report what they should. No timing asserts: the figures
depend on the machine and on whatever else runs on it; only that the parts talk and count."""

from __future__ import annotations

import io

import orjson
import pytest

from outpost.benchmarks.clients import run_clients_bench
from outpost.benchmarks.ingest import IngestBenchOptions, run_ingest_bench
from tests.conftest import outpost

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SUMMARY_KEYS = {
    "raw_per_s",
    "ingest_per_s",
    "ratio",
    "batched_raw_per_s",
    "batched_per_s",
    "latency_qos0",
    "targets_met",
    "all_targets_met",
}


def test_ingest_bench_counts_what_it_sends() -> None:
    options = IngestBenchOptions(duration_s=0.5, warmup_s=0.3, quick=True, batched_devices=50)
    result = run_ingest_bench(options, only={"single", "batched", "latency"})
    orjson.dumps(result)  # the --json form is this dict

    summary = result["summary"]
    assert set(summary) >= SUMMARY_KEYS
    for key in ("raw_per_s", "ingest_per_s", "ratio", "batched_raw_per_s", "batched_per_s"):
        assert summary[key] > 0, key
    assert summary["latency_qos0"]["count"] > 0
    assert summary["latency_qos0"]["p99_ms"] >= summary["latency_qos0"]["p50_ms"] > 0

    for name, scenario in result["scenarios"].items():
        for phase in scenario["phases"].values():
            assert phase["sent"] > 0 and phase["received"] > 0, (name, phase)
            if phase["target"] == "ingest":
                # every generated reading is valid: nothing may be dead-lettered
                assert phase["sink"]["dlq"] == 0, phase["sink"]
                assert phase["ingest_exit"] == 0


def test_cli_json_is_one_object_on_the_last_line() -> None:
    p = outpost(
        "bench", "ingest", "--quick", "--duration", "0.5", "--warmup", "0.3", "--scenario", "single", "--json"
    )
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout
    assert out.count("\n") == 1  # the phases' progress is on stderr
    assert "single_raw:" in p.stderr and "single_ingest:" in p.stderr
    result = orjson.loads(out.strip().splitlines()[-1])
    assert result["bench"] == "ingest"
    assert result["summary"]["raw_per_s"] > 0 and result["summary"]["ingest_per_s"] > 0


def test_bus_bench_runs_paho_and_the_bus() -> None:
    result = run_clients_bench(clients=("paho", "bus"), qos_levels=(0, 1), warmup_s=0.3, measure_s=0.5)
    rows = {(r["client"], r["qos"]): r for r in result["runs"]}
    assert set(rows) == {("paho", 0), ("paho", 1), ("bus", 0), ("bus", 1)}
    for row in rows.values():
        assert row["error"] is None, row
        assert row["msgs_per_s"] > 0 and row["received"] > 0, row
    for qos1 in (rows[("paho", 1)], rows[("bus", 1)]):
        assert qos1["undelivered"] == 0, qos1


def test_inference_bench_counts_what_it_scores() -> None:
    from outpost.benchmarks.inference import InferenceBenchOptions, run_inference_bench

    o = InferenceBenchOptions(duration_s=1.0, warmup_s=0.6, raw_calls=100, rate=1000.0, devices=20)
    result = run_inference_bench(o)
    orjson.dumps(result)  # the --json form is this dict
    assert set(result["raw"]) == {"1", "32", "256"}
    for r in result["raw"].values():
        assert r["p99_us"] >= r["p50_us"] > 0 and r["rows_per_s"] > 0
    lat = result["latency"]
    assert lat["scored_per_s"] > 0 and lat["stamped_in_window_delivered"] > 0
    assert lat["p99_ms"] >= lat["p50_ms"] > 0 and lat["rejected"] == 0
    sat = result["saturation"]
    assert sat["rows"] > 0 and sat["per_row_compute_cpu_us"] > 0
    assert result["compute_ratio_vs_raw"] > 0
    assert set(result["targets"]) == {"compute_ratio_max", "compute_ratio_met", "p99_ms_max", "p99_met"}


def test_memory_bench_counts_what_it_appends() -> None:
    from outpost.benchmarks.memory import run_memory_bench

    result = run_memory_bench(quick=True)
    orjson.dumps(result)
    assert set(result["log"]) == {"1", "100", "1000"}
    for r in result["log"].values():
        assert r["raw_per_s"] > 0 and r["oplog_per_s"] > 0 and r["records"] > 0


OVERLOAD_PHASE_KEYS = {
    "canary",
    "drain",
    "peak_rss_mb",
    "services",
    "ingest_counters",
    "ingest_dlq_agreement",
    "cpu_pct",
    "targets",
}
OVERLOAD_LOAD_KEYS = {
    "sent",
    "offered_msgs_per_s",
    "events",
    "dead_lettered",
    "dead_lettered_by_reason",
    "shed_counted",
    "accounted",
    "difference",
}


def test_overload_bench_prints_its_figures_as_json() -> None:
    p = outpost(
        "bench",
        "overload",
        "--duration",
        "1",
        "--flood-messages",
        "2000",
        "--bad-batch-items",
        "200",
        "--bad-batch-bytes",
        "20000",
        "--bad-batch-rate",
        "2",
        "--drain",
        "5",
        "--json",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = orjson.loads(p.stdout.strip().splitlines()[-1])
    assert result["bench"] == "overload"
    assert set(result["phases"]) == {"baseline", "flood", "bad_batches"}
    for name, phase in result["phases"].items():
        assert set(phase) >= OVERLOAD_PHASE_KEYS, name
        assert phase["canary"]["sent"] > 0 and phase["canary"]["delivered"] > 0, phase["canary"]
        assert {"ingest", "inference", "memory", "mosquitto"} <= set(phase["peak_rss_mb"]), phase[
            "peak_rss_mb"
        ]
        if name != "baseline":
            assert set(phase["load"]) >= OVERLOAD_LOAD_KEYS, phase["load"]
            assert phase["load"]["sent"] > 0
            ld = phase["load"]
            # shed messages are in the aggregate dead letters' counts: shown beside, never added
            assert ld["accounted"] == ld["events"] + ld["dead_lettered"]
            assert ld["shed_counted"] <= ld["dead_lettered"]
    assert (
        result["phases"]["bad_batches"]["load"]["sent"]
        == 200 * result["phases"]["bad_batches"]["load"]["messages"]
    )
    assert {"all_targets_met", "targets_met", "flood_offered_msgs_per_s"} <= set(result["summary"])

    from rich.console import Console

    from outpost.benchmarks.report import print_overload

    table = io.StringIO()
    print_overload(result, Console(file=table, width=160))  # the form without --json
    assert "canaries delivered / sent" in table.getvalue()


def test_agent_bench_finds_each_decisions_reading() -> None:
    """A decision's trace is its reading's id as ingest gives it: the sink's index must agree."""
    from outpost.benchmarks.agent import collapsed_summary, reading_index
    from outpost.contracts import reading_id

    index = reading_index("bench-agent", 3, 12)
    assert len(index) == 12
    for k in range(12):
        assert index[reading_id("bench-agent", f"shelf-{k % 3:05d}", k // 3)] == k
    prof = collapsed_summary("main;work;hash 3\nmain;work 1\nmain;wait 4\nnot a line\n")
    assert prof["samples"] == 8
    assert prof["self_pct"][0] == ("wait", 50.0)
    assert ("main", 100.0) in prof["inclusive_pct"]


AGENT_PIPELINE_KEYS = {
    "sent",
    "sent_in_window",
    "decided",
    "decided_in_window",
    "missing_in_window",
    "duplicates",
    "unknown",
    "unscored_expected",
    "not_decided",
    "kinds",
    "offered_per_s",
    "decisions_per_s",
    "latency",
    "cpu_pct",
    "service_counters",
    "service_histograms",
}


def test_agent_bench_prints_its_figures_as_json() -> None:
    p = outpost(
        "bench",
        "agent",
        "--quick",
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "--rate",
        "200",
        "--devices",
        "10",
        "--json",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = orjson.loads(p.stdout.strip().splitlines()[-1])
    assert result["bench"] == "agent"
    assert set(result["phases"]) == {"hops", "pipeline"}
    hops, pipe = result["phases"]["hops"], result["phases"]["pipeline"]
    assert hops["sent"] > 0 and hops["received"] > 0 and hops["latency"]["count"] > 0
    assert set(pipe) >= AGENT_PIPELINE_KEYS
    assert pipe["sent"] > 0 and 0 < pipe["decided"] <= pipe["sent"]
    assert pipe["duplicates"] == 0 and pipe["unknown"] == 0
    assert set(pipe["kinds"]) == {"act (dry run)"}  # every decision acts, dry-run: none held back
    inference = pipe["service_counters"]["inference"]
    assert inference["warming.shelf-stock"] == pipe["unscored_expected"] == 10 * 3  # min_readings 4
    assert pipe["not_decided"] == pipe["unscored_expected"]  # every scored reading got its decision
    assert {"ingest", "inference", "agents", "mosquitto"} <= set(pipe["cpu_pct"])
    assert {"pipeline_p99_ms", "hops_p99_ms", "decisions_per_s", "all_targets_met"} <= set(result["summary"])
    for svc in result["services"].values():
        assert svc["restarts"] == 0


def test_agent_bench_acts_when_asked() -> None:
    """--act: every decision acts (an action request to a connector nobody serves), none held back
    by the breaker though the site's gateway refuses each request."""
    p = outpost(
        "bench",
        "agent",
        "--quick",
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "--rate",
        "200",
        "--devices",
        "10",
        "--act",
        "--json",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    pipe = orjson.loads(p.stdout.strip().splitlines()[-1])["phases"]["pipeline"]
    assert set(pipe["kinds"]) == {"act"}
    assert pipe["service_counters"]["agents"]["actions.bench"] == pipe["decided"] > 0


CONNECTOR_GATEWAY_KEYS = {
    "sent",
    "results",
    "outcomes",
    "missing",
    "duplicates",
    "unknown",
    "latency",
    "peer_keys",
    "peer_effects_not_once",
    "cpu_pct",
}


def test_connectors_bench_prints_its_figures_as_json() -> None:
    """Direct calls, the broker hop and the gateway in one run, the paced direct and gateway phases
    in turns: every request of the gateway phases has its result and its effect at the peer once."""
    p = outpost(
        "bench",
        "connectors",
        "--quick",
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "--rate",
        "100",
        "--window",
        "200",
        "--rounds",
        "2",
        "--json",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = orjson.loads(p.stdout.strip().splitlines()[-1])
    assert result["bench"] == "connectors"
    phases = result["phases"]
    assert set(phases) == {"direct", "direct_max", "hops", "gateway", "gateway_max"}
    assert phases["direct"]["spans"] == phases["gateway"]["spans"] == 2  # the paced pair took turns
    for name in ("direct", "direct_max"):
        d = phases[name]
        assert d["answered"] == d["sent"] > 0 and set(d["statuses"]) == {"201"}, d
        assert d["latency"]["count"] > 0
    assert phases["hops"]["received"] == phases["hops"]["sent"] > 0
    for name in ("gateway", "gateway_max"):
        g = phases[name]
        assert set(g) >= CONNECTOR_GATEWAY_KEYS, name
        assert g["results"] == g["sent"] > 0 and g["outcomes"] == {"done": g["sent"]}, g
        assert g["missing"] == g["duplicates"] == g["unknown"] == 0
        assert g["peer_keys"] == g["sent"] and g["peer_effects_not_once"] == 0
        assert {"connectors", "mosquitto", "store_api"} <= set(g["cpu_pct"])
    assert phases["gateway"]["latency"]["count"] > 0
    stages = phases["gateway"]["stages"]  # from the outbox's times: every request in the window
    assert set(stages) == {"to_gateway", "in_gateway", "result_out"}
    assert all(st["count"] == phases["gateway"]["latency"]["count"] for st in stages.values()), stages
    s = result["summary"]
    assert {"added_p50_ms", "added_p99_ms", "gateway_max_actions_per_s", "all_targets_met"} <= set(s)
    assert s["every_request_accounted"] is True
    for svc in result["services"].values():
        assert svc["restarts"] == 0

    from rich.console import Console

    from outpost.benchmarks.report import print_connectors

    table = io.StringIO()
    print_connectors(result, Console(file=table, width=200))  # the form without --json
    assert "added by the gateway" in table.getvalue()


UPLINK_SETUP_KEYS = {
    "offered",
    "held",
    "lost",
    "duplicates",
    "bridge_up_after_back_s",
    "first_after_back_s",
    "drain_per_s",
    "empty_s",
    "cpu_pct",
}


def test_uplink_bench_holds_everything_after_an_outage() -> None:
    """A 2 s outage at 100 records/s: the uplink, capped or not, holds at the cloud every record the
    edge broker acknowledged, once; every setup reports its figures on the last line."""
    p = outpost(
        "bench", "uplink", "--outage-s", "2", "--rate", "100", "--cap", "20000", "--stall-s", "3", "--json"
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = orjson.loads(p.stdout.strip().splitlines()[-1])
    assert result["bench"] == "uplink"
    setups = result["setups"]
    assert set(setups) == {"uplink", "uplink_capped", "bridge", "bridge_kill9"}
    for name, s in setups.items():
        assert set(s) >= UPLINK_SETUP_KEYS, name
        assert s["offered"] > 0 and s["producer_flushed"], (name, s)
    for name in ("uplink", "uplink_capped"):
        s = setups[name]
        assert s["held"] == s["offered"] and s["lost"] == 0 and s["duplicates"] == 0, s
        assert s["outbox_left"] == 0 and s["wire"]["messages"] > 0, s
    assert setups["uplink_capped"]["cap"] == 20_000 and setups["uplink_capped"]["cap_over_pct"] is not None
    assert result["targets"]["zero_loss"]["met"] is True

    from rich.console import Console

    from outpost.benchmarks.uplink import print_uplink

    table = io.StringIO()
    print_uplink(result, Console(file=table, width=200))  # the form without --json
    assert "held at the cloud" in table.getvalue()


def test_idle_bench_measures_every_process_of_the_site() -> None:
    p = outpost("bench", "idle", "--quick", "--duration", "2", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    result = orjson.loads(p.stdout.strip().splitlines()[-1])
    assert result["bench"] == "idle"
    services = {"agents", "connectors", "inference", "ingest", "memory", "telemetry", "uplink"}
    assert set(result["processes"]) == services | {"mosquitto", "cloud broker"}
    for role, proc in result["processes"].items():
        assert proc["cpu_pct"] >= 0 and proc["wakeups_s"] >= 0 and proc["threads"] >= 1, role
    s = result["summary"]
    assert s["restarts"] == 0
    site = [p for role, p in result["processes"].items() if role != "cloud broker"]
    assert s["site_wakeups_s"] == pytest.approx(sum(p["wakeups_s"] for p in site), abs=0.5)
    assert s["site_wakeups_s"] > 0  # the services' timers (status, metrics, disk checks) do run
