"""`outpost demo` end to end, as a newcomer runs it: broker, ingest, simulator, summary, clean stop."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest

from outpost.broker import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_reports_and_stops_everything() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "outpost.cli.main",
            "demo",
            "--duration",
            "4",
            "--devices",
            "12",
            "--rate",
            "400",
            "--bad-ratio",
            "0.05",
            "--json",
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    summary = orjson.loads(proc.stdout.decode().strip().splitlines()[-1])
    sim = summary["sim"]
    assert summary["sent"] == sim["sent_readings"] > 0
    # every good reading came out once, every bad payload was dead-lettered once
    assert summary["validated"] == summary["sent"]
    assert summary["rejected"] == sim["bad_total"] > 0
    assert summary["duplicates_dropped_by_consumer"] == 0
    everyone = ("ingest", "inference", "memory", "agents", "connectors", "telemetry", "uplink")
    assert summary["restarts"] == dict.fromkeys(everyone, 0)
    # scores flow, each with its model and version, from both shipped models
    assert summary["scores"] > 0
    assert {m.split("@")[0] for m in summary["scores_by_model"]} == {"fridge-anomaly", "shelf-stock"}
    # the services were stopped before the summary: their final counters are in it
    assert summary["services"] == dict.fromkeys(everyone, "stopped")
    assert summary["exit_codes"] == dict.fromkeys(everyone, 0)
    assert summary["ingest_counters"]["events"] == summary["validated"]
    # the operational log holds every event, score and dead letter of the run
    logged = summary["memory_counters"]["entries"]
    assert logged >= summary["validated"] + summary["scores"] + summary["rejected"]
    assert summary["stopped_cleanly"] is True
    # the retail agents, as the agent service reported them (control/agents/reported)
    agents = summary["agents"]
    assert set(agents) == {"restock", "cold-chain", "customer-messages"}
    for a in agents.values():
        assert set(a) == {"state", "decisions", "escalations", "escalations_open", "actions", "override_rate"}
        assert a["decisions"] >= a["actions"] + a["escalations"]
        assert a["escalations"] >= a["escalations_open"] >= 0
    # the agents' actions were carried out on the shop's peers the demo started, each once
    actions, peers = summary["actions"], summary["peers"]
    for connector, a in actions.items():
        assert connector in ("store", "mail")
        assert set(a["outcomes"]) <= {"done", "duplicate"}, a  # nothing failed, expired or refused
    store_done = actions.get("store", {}).get("outcomes", {}).get("done", 0)
    assert sum(p["effects"] for p in peers["store_api"].values()) == store_done
    assert all(p["effects"] <= p["requests"] for p in peers["store_api"].values())
    assert peers["mails_duplicated"] == 0
    # a clean demo leaves no state folder behind (and says so)
    assert summary["state_dir"] is None
    assert summary["latency_ms"]["p99"] >= summary["latency_ms"]["p50"] > 0
    # the telemetry service wrote its rollups to the demo's time-series server
    tel = summary["telemetry"]
    assert tel["points"] > 0 and tel["bytes_upstream"] > 0
    # dead letters always go; diagnostics go within the byte budget, thinned per series (a hash of
    # the series picks its windows), so which of them a 4 s run shows varies: at least one does
    assert "dlq" in tel["measurements"]
    assert {"process", "service_counter", "service_latency"} & set(tel["measurements"])


def test_with_the_cloud_gone_the_site_decides_and_acts_and_keeps_what_the_cloud_must_get() -> None:
    """Offline operation: ``uplink.cloud`` names a cloud broker that does not answer (nothing
    listens there) for the whole run. The agents still decide and the connectors still act on the
    shop's local peers; the uplink takes the decisions, action results and events into its outbox,
    which holds them for the cloud: nothing upstream blocks a local decision."""
    env = {
        **os.environ,
        "OUTPOST_UPLINK__CLOUD": f"127.0.0.1:{free_port()}",
        "OUTPOST_UPLINK__EVENTS": '["*"]',
    }
    proc = subprocess.run(
        [sys.executable, "-m", "outpost.cli.main", "demo", "--duration", "6", "--devices", "12", "--json"],
        capture_output=True,
        timeout=180,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    summary = orjson.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert summary["stopped_cleanly"] is True
    assert summary["validated"] == summary["sent"] > 0
    agents = summary["agents"]
    assert sum(a["decisions"] for a in agents.values()) > 0
    done = sum(a["outcomes"].get("done", 0) for a in summary["actions"].values())
    assert done > 0, summary["actions"]
    taken, state = summary["uplink_counters"], summary["uplink_state"]
    assert state["uplink_up"] is False
    for stream in ("decisions", "actions", "events"):
        assert taken.get(f"uplink_taken.{stream}", 0) > 0, taken
    assert taken.get("uplink_acked.events", 0) == 0
    assert state["outbox_records"] == sum(v for k, v in taken.items() if k.startswith("uplink_taken."))
