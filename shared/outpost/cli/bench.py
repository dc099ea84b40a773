"""``outpost bench NAME``: the benchmarks, as tables for people or one JSON object for scripts.

The harnesses live in :mod:`outpost.benchmarks` so that ``load-tests/`` scripts, this command and the
smoke test run the same code; this module only parses options and prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from outpost.benchmarks.clients import CLIENTS, run_clients_bench
from outpost.benchmarks.ingest import IngestBenchOptions, plan, run_ingest_bench
from outpost.benchmarks.report import clients_table, machine_line, print_ingest
from outpost.cli.output import JsonOpt, print_json, stdout_console
from outpost.cli.progress import Phases
from outpost.errors import ConfigError

bench_app = typer.Typer(
    name="bench",
    help="Benchmarks against a Mosquitto the command starts itself (figures: docs/benchmarks.md).",
    no_args_is_help=True,
)

QuickOpt = Annotated[
    bool,
    typer.Option(
        "--quick", help="A short run (seconds to a minute): fewer, shorter phases; a check, not a figure."
    ),
]


@bench_app.command("ingest")
def ingest(
    quick: QuickOpt = False,
    duration: Annotated[
        float | None,
        typer.Option("--duration", min=0.2, help="Measured seconds per phase (6; --quick: 1.2)."),
    ] = None,
    warmup: Annotated[
        float | None,
        typer.Option("--warmup", min=0.0, help="Seconds of load before each window (1; --quick: 0.4)."),
    ] = None,
    devices: Annotated[
        int, typer.Option("--devices", min=1, help="Devices of the one-reading scenarios.")
    ] = 100,
    batch: Annotated[int, typer.Option("--batch", min=2, help="Readings per message when batched.")] = 100,
    latency_rate: Annotated[
        float, typer.Option("--latency-rate", min=1.0, help="Readings/s offered for the latency figures.")
    ] = 5000.0,
    scenario: Annotated[
        list[str] | None, typer.Option("--scenario", help="Run only these scenarios (repeatable).")
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option("--profile", help="py-spy ingest during each window; collapsed stacks here."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Raw paho receive rate vs validated events out of ingest, and ingest latency p50/p99.

    One reading and 100 readings a message, QoS 0 and 1; every party runs in its own process.
    """
    kw: dict[str, object] = {
        "devices": devices,
        "batch": batch,
        "latency_rate": latency_rate,
        "profile_dir": profile,
    }
    if warmup is not None:
        kw["warmup_s"] = warmup
    options = IngestBenchOptions.make(quick=quick, duration_s=duration, **kw)
    known = set(plan(options))
    only = set(scenario) if scenario else None
    if only is not None and not only <= known:
        raise ConfigError(f"unknown scenario {sorted(only - known)}; known: {sorted(known)}")
    with Phases("bench ingest") as say:
        result = run_ingest_bench(options, progress=say, only=only)
    if json_out:
        print_json(result)
    else:
        print_ingest(result, stdout_console())


@bench_app.command("bus")
def bus(
    quick: QuickOpt = False,
    duration: Annotated[
        float | None, typer.Option("--duration", min=0.2, help="Measured seconds per run.")
    ] = None,
    client: Annotated[
        list[str] | None,
        typer.Option("--client", help=f"Only these clients (repeatable): {', '.join(CLIENTS)}."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """paho-mqtt vs Outpost's bus vs aiomqtt vs FastStream, QoS 0 and 1.

    One publisher process -> one subscriber process, the same client at both ends, ~126-byte payloads.
    """
    clients = tuple(client) if client else CLIENTS
    unknown = set(clients) - set(CLIENTS)
    if unknown:
        raise ConfigError(f"unknown client {sorted(unknown)}; known: {', '.join(CLIENTS)}")
    measure = duration if duration is not None else (1.5 if quick else 4.0)
    with Phases("bench bus") as say:
        result = run_clients_bench(
            clients=clients,
            warmup_s=0.5 if quick else 1.0,
            measure_s=measure,
            progress=say,
        )
    if json_out:
        print_json(result)
    else:
        out = stdout_console()
        out.print(clients_table(result))
        out.print(machine_line(result))
        for s in result.get("skipped", []):
            out.print(f"skipped: {s}")


@bench_app.command("inference")
def inference(
    quick: QuickOpt = False,
    backend: Annotated[
        str, typer.Option("--backend", help="onnxruntime, tensorrt or auto (as the service's setting).")
    ] = "onnxruntime",
    rate: Annotated[
        float, typer.Option("--rate", min=1.0, help="Events/s offered in the latency phase.")
    ] = 5000.0,
    duration: Annotated[
        float | None,
        typer.Option("--duration", min=0.5, help="Measured seconds per service phase (8; --quick: 3)."),
    ] = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, max=4096, help="The service's inference.max_batch.")
    ] = 256,
    json_out: JsonOpt = False,
) -> None:
    """Raw session.run (batch 1, 32, 256) vs the inference service through the bus: event-to-score
    p50/p99 at a fixed offered load, and per-row compute when batches fill."""
    from rich.table import Table

    from outpost.benchmarks.inference import InferenceBenchOptions, run_inference_bench

    if backend not in ("onnxruntime", "tensorrt", "auto"):
        raise ConfigError(f"--backend must be onnxruntime, tensorrt or auto, got {backend!r}")
    kw: dict[str, object] = {"backend": backend, "rate": rate, "max_batch": max_batch}
    if duration is not None:
        kw["duration_s"] = duration
    options = InferenceBenchOptions.make(quick=quick, **kw)
    with Phases("bench inference") as say:
        result = run_inference_bench(options, progress=say)
    if json_out:
        print_json(result)
        return
    out = stdout_console()
    t = Table(title=f"raw session.run: {result['model']} on {result['backend']}")
    for col in ("batch", "p50 us/call", "p99 us/call", "us/row", "rows/s"):
        t.add_column(col, justify="right")
    for b, r in result["raw"].items():
        t.add_row(
            str(b),
            f"{r['p50_us']:.1f}",
            f"{r['p99_us']:.1f}",
            f"{r['per_row_us']:.3f}",
            f"{r['rows_per_s']:,}",
        )
    cold = result["raw_cold_cache"]
    t.add_row(f"{cold['batch']} (cold cache)", f"{cold['p50_us']:.1f}", "", f"{cold['per_row_us']:.3f}", "")
    out.print(t)
    t = Table(title="the service through the bus")
    for col in (
        "phase",
        "offered/s",
        "scored/s",
        "p50 ms",
        "p99 ms",
        "avg batch",
        "us/row wall",
        "us/row CPU",
        "rejected",
    ):
        t.add_column(col, justify="right")
    for name in ("latency", "latency_single", "saturation"):
        r = result[name]
        t.add_row(
            name,
            f"{r['offered_per_s']:,.0f}",
            f"{r['scored_per_s']:,}",
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['avg_batch']:.1f}",
            f"{r['per_row_compute_us']:.3f}",
            f"{r['per_row_compute_cpu_us']:.3f}",
            str(r["rejected"]),
        )
    out.print(t)
    tg = result["targets"]
    out.print(
        f"per-row compute (CPU time of the session call) vs raw at batch {result['compute_batch']}: "
        f"{result['compute_ratio_vs_raw']}x (vs raw with a cold cache: "
        f"{result['compute_ratio_vs_raw_cold_cache']}x), wall time {result['compute_wall_ratio_vs_raw']}x "
        f"(target <= {tg['compute_ratio_max']}x: {'met' if tg['compute_ratio_met'] else 'MISSED'}); "
        f"p99 {result['latency']['p99_ms']} ms at {options.rate:,.0f}/s "
        f"(target < {tg['p99_ms_max']} ms: {'met' if tg['p99_met'] else 'MISSED'})"
    )


@bench_app.command("memory")
def memory(
    quick: QuickOpt = False,
    sync: Annotated[
        str, typer.Option("--sync", help="SQLite synchronous: FULL (default), NORMAL, OFF.")
    ] = "FULL",
    json_out: JsonOpt = False,
) -> None:
    """Durable appends/s to the operational log (batches of 1, 100, 1,000) next to raw SQLite
    inserts of the same rows with the same durability; long-term memory queries at 100,000 items;
    text embedding latency and throughput next to the raw session.run."""
    from rich.table import Table

    from outpost.benchmarks.memory import run_memory_bench

    if sync not in ("FULL", "NORMAL", "OFF"):
        raise ConfigError(f"--sync must be FULL, NORMAL or OFF, got {sync!r}")
    with Phases("bench memory") as say:
        say("log appends, long-term memory queries, text embeddings")
        result = run_memory_bench(quick=quick, sync=sync)  # type: ignore[arg-type]
    if json_out:
        print_json(result)
        return
    t = Table(title=f"operational log appends, synchronous={sync}, {result['body_bytes']}-byte bodies")
    for col in ("batch", "records", "raw SQLite /s", "oplog /s", "ratio"):
        t.add_column(col, justify="right")
    for b, r in result["log"].items():
        t.add_row(b, f"{r['records']:,}", f"{r['raw_per_s']:,}", f"{r['oplog_per_s']:,}", f"{r['ratio']:.2f}")
    out = stdout_console()
    out.print(t)
    tg = result["targets"]
    out.print(
        f"batched (1,000): {result['log']['1000']['oplog_per_s']:,} durable appends/s "
        f"(target >= {tg['appends_per_s_min']:,.0f}: {'met' if tg['appends_met'] else 'MISSED'})"
    )
    v = result["vectors"]
    out.print(
        f"long-term memory, {v['items']:,} x {v['dim']}: built in {v['build_s']} s, top-10 query "
        f"p50 {v['query_p50_ms']} ms, p99 {v['query_p99_ms']} ms, recall@10 {v['recall_at_10']} "
        f"(target p99 < {tg['query_p99_ms_max']} ms at 100,000: {'met' if tg['query_met'] else 'MISSED'})"
    )
    x = result["text"]
    out.print(
        f"text embeddings ({x['model']}, {x['texts']} texts): one at a time p50 {x['embed_one_p50_ms']} ms, "
        f"p99 {x['embed_one_p99_ms']} ms (raw session.run p50 {x['raw_run_p50_ms']} ms, "
        f"p99 {x['raw_run_p99_ms']} ms); {x['batch32_texts_per_s']:,} texts/s in batches of 32, "
        f"{x['one_at_a_time_texts_per_s']:,} one at a time"
    )


@bench_app.command("overload")
def overload(
    quick: Annotated[
        bool, typer.Option("--quick", help="3 s windows, a 20,000-message flood (about 45 s).")
    ] = False,
    duration: Annotated[
        float | None,
        typer.Option(
            "--duration", min=0.5, help="Measured seconds per phase, the load inside (10; --quick: 3)."
        ),
    ] = None,
    flood_messages: Annotated[
        int | None,
        typer.Option("--flood-messages", min=1, help="QoS 0 messages the flooding device sends (100,000)."),
    ] = None,
    flood_client: Annotated[
        str, typer.Option("--flood-client", help="raw (PUBLISH packets on a socket, the fastest) or paho.")
    ] = "raw",
    canaries: Annotated[int, typer.Option("--canaries", min=1, help="Canary devices (QoS 1).")] = 5,
    canary_rate: Annotated[
        float, typer.Option("--canary-rate", min=0.1, help="Readings/s of each canary.")
    ] = 40.0,
    bad_batch_bytes: Annotated[
        int, typer.Option("--bad-batch-bytes", min=1000, help="Size of each bad batch.")
    ] = 1_000_000,
    bad_batch_items: Annotated[
        int | None,
        typer.Option(
            "--bad-batch-items", min=1, help="Invalid readings in each bad batch (ingest.max_batch)."
        ),
    ] = None,
    bad_batch_rate: Annotated[
        float, typer.Option("--bad-batch-rate", min=0.01, help="Bad batches a second.")
    ] = 1.0,
    drain: Annotated[
        float | None,
        typer.Option("--drain", min=0.0, help="Longest wait after each window for what is on its way (30)."),
    ] = None,
    phase: Annotated[
        list[str] | None,
        typer.Option("--phase", help="Only these phases (repeatable): baseline, flood, bad_batches."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Canary devices at QoS 1 while one device floods, then while one sends 1 MB bad batches.

    Runs the real site (broker and every service) fresh for each phase: canary p50/p99 against the
    same canaries with no load, canary readings delivered, the load device's readings accounted for
    (events + dead letters + counted shedding = sent), every service's peak RSS.
    """
    from outpost.benchmarks.overload import PHASES, OverloadOptions, run_overload_bench
    from outpost.benchmarks.report import print_overload

    phases = tuple(phase) if phase else PHASES
    if set(phases) - set(PHASES):
        raise ConfigError(f"unknown phase {sorted(set(phases) - set(PHASES))}; known: {', '.join(PHASES)}")
    if flood_client not in ("raw", "paho"):
        raise ConfigError(f"--flood-client must be raw or paho, got {flood_client!r}")
    kw: dict[str, Any] = {
        "flood_client": flood_client,
        "canaries": canaries,
        "canary_rate": canary_rate,
        "bad_batch_bytes": bad_batch_bytes,
        "bad_batch_rate": bad_batch_rate,
        "phases": phases,
    }
    if quick:
        kw.update(duration_s=3.0, warmup_s=0.5, flood_messages=20_000, drain_s=10.0)
    for key, value in (
        ("duration_s", duration),
        ("flood_messages", flood_messages),
        ("bad_batch_items", bad_batch_items),
        ("drain_s", drain),
    ):
        if value is not None:
            kw[key] = value
    with Phases("bench overload") as say:
        result = run_overload_bench(OverloadOptions(**kw), progress=say)
    if json_out:
        print_json(result)
    else:
        print_overload(result, stdout_console())


@bench_app.command("agent")
def agent(
    quick: Annotated[bool, typer.Option("--quick", help="3 s windows (about 30 s).")] = False,
    rate: Annotated[
        float, typer.Option("--rate", min=1.0, help="Readings/s offered in both phases.")
    ] = 2000.0,
    devices: Annotated[int, typer.Option("--devices", min=1, help="Shelf devices (round-robin).")] = 100,
    duration: Annotated[
        float | None,
        typer.Option("--duration", min=0.5, help="Measured seconds per phase (10; --quick: 3)."),
    ] = None,
    warmup: Annotated[
        float | None,
        typer.Option("--warmup", min=0.0, help="Seconds of load before each window (2; --quick: 1)."),
    ] = None,
    act: Annotated[
        bool,
        typer.Option("--act", help="The agent acts (to a connector nobody serves) instead of dry-run."),
    ] = False,
    without: Annotated[
        list[str] | None,
        typer.Option("--without", help="Do not start this service of the site (repeatable): memory."),
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option("--profile", help="py-spy every service in the pipeline's window; stacks here."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """The whole pipeline (ingest, inference, an agent deciding on every score) at a fixed rate:
    decisions/s and reading-to-decision p50/p99, next to the broker hops alone, in one run.

    Starts the real site (its own Mosquitto and every service, as ``outpost up``) with one agent
    declared in the site file; shelf devices publish shelf_weight readings at QoS 1.
    """
    from outpost.benchmarks.agent import AgentBenchOptions, run_agent_bench
    from outpost.benchmarks.report import print_agent

    kw: dict[str, Any] = {
        "rate": rate,
        "devices": devices,
        "act": act,
        "without": tuple(without or ()),
        "profile_dir": profile,
    }
    if duration is not None:
        kw["duration_s"] = duration
    if warmup is not None:
        kw["warmup_s"] = warmup
    options = AgentBenchOptions.make(quick=quick, **kw)
    with Phases("bench agent") as say:
        result = run_agent_bench(options, progress=say)
    if json_out:
        print_json(result)
    else:
        print_agent(result, stdout_console())


@bench_app.command("connectors")
def connectors(
    quick: Annotated[bool, typer.Option("--quick", help="3 s windows (about 40 s).")] = False,
    rate: Annotated[
        float, typer.Option("--rate", min=1.0, help="Actions/s offered in the paced phases.")
    ] = 1000.0,
    concurrency: Annotated[
        int,
        typer.Option("--concurrency", min=1, max=256, help="Calls in flight: the connector's and direct."),
    ] = 8,
    duration: Annotated[
        float | None,
        typer.Option("--duration", min=0.5, help="Measured seconds per phase (10; --quick: 3)."),
    ] = None,
    warmup: Annotated[
        float | None,
        typer.Option("--warmup", min=0.0, help="Seconds of load before each window (2; --quick: 1)."),
    ] = None,
    window: Annotated[
        int, typer.Option("--window", min=1, help="Flat-out gateway phase: most requests unanswered.")
    ] = 2000,
    rounds: Annotated[
        int | None,
        typer.Option(
            "--rounds",
            min=1,
            max=100,
            help="The paced direct and gateway phases take turns, this many each (5; --quick: 3).",
        ),
    ] = None,
    log_sync: Annotated[
        str, typer.Option("--log-sync", help="The outbox's SQLite synchronous: FULL (default), NORMAL, OFF.")
    ] = "FULL",
    profile: Annotated[
        Path | None,
        typer.Option("--profile", help="py-spy the gateway during the paced gateway window; stacks here."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """The connector gateway against direct httpx calls to the same local endpoint, in one run:
    actions/s and the p50/p99 latency the gateway adds, next to the broker hops alone.

    Starts the simulated store API (a process of its own) and the site with only the connector
    gateway (its own Mosquitto, the durable outbox); every request has a key of its own.
    """
    from outpost.benchmarks.connectors import ConnectorsBenchOptions, run_connectors_bench
    from outpost.benchmarks.report import print_connectors

    if log_sync not in ("FULL", "NORMAL", "OFF"):
        raise ConfigError(f"--log-sync must be FULL, NORMAL or OFF, got {log_sync!r}")
    kw: dict[str, Any] = {
        "rate": rate,
        "concurrency": concurrency,
        "window": window,
        "log_sync": log_sync,
        "profile_dir": profile,
    }
    if duration is not None:
        kw["duration_s"] = duration
    if warmup is not None:
        kw["warmup_s"] = warmup
    if rounds is not None:
        kw["rounds"] = rounds
    options = ConnectorsBenchOptions.make(quick=quick, **kw)
    with Phases("bench connectors") as say:
        result = run_connectors_bench(options, progress=say)
    if json_out:
        print_json(result)
    else:
        print_connectors(result, stdout_console())


@bench_app.command("telemetry")
def telemetry(
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="20 devices at 200 readings/s for 12 s, 4 s windows (a check, not a figure)."
        ),
    ] = False,
    devices: Annotated[
        int | None, typer.Option("--devices", min=1, help="Retail devices (50; --quick: 20).")
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option("--rate", min=1.0, help="Readings/s of the whole fleet (1,000; --quick: 200)."),
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option("--duration", min=1.0, help="Seconds the fleet sends (180; --quick: 12)."),
    ] = None,
    rollup: Annotated[
        float | None,
        typer.Option("--rollup", min=1.0, help="The telemetry service's window, s (60; --quick: 4)."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Upstream bytes per device per minute with the telemetry service's rollups against forwarding
    every validated reading raw, for the retail scenario, in one run; and the rolled-up p99 against
    the exact p99 of the same latencies.

    Starts the site (its own Mosquitto and every service) and two VictoriaMetrics of its own, and
    plays the simulator's retail fleet; bytes are counted by the servers (HTTP included).
    """
    from outpost.benchmarks.telemetry import TelemetryBenchOptions, print_telemetry, run_telemetry_bench

    kw: dict[str, Any] = {}
    for key, value in (("devices", devices), ("rate", rate), ("duration_s", duration), ("rollup_s", rollup)):
        if value is not None:
            kw[key] = value
    options = TelemetryBenchOptions.make(quick=quick, **kw)
    with Phases("bench telemetry") as say:
        result = run_telemetry_bench(options, progress=say)
    if json_out:
        print_json(result)
    else:
        print_telemetry(result, stdout_console())


@bench_app.command("uplink")
def uplink(
    outage: Annotated[
        float,
        typer.Option("--outage-s", min=1.0, help="Seconds the link is down while the producers publish."),
    ] = 300.0,
    rate: Annotated[
        float, typer.Option("--rate", min=10.0, help="Records/s each setup's producer offers (10 a message).")
    ] = 1000.0,
    cap: Annotated[
        int, typer.Option("--cap", min=1000, help="uplink.max_bytes_s of the capped setup, bytes/s.")
    ] = 1_000_000,
    db: Annotated[
        str,
        typer.Option(
            "--db",
            help="The cloud side's database: sqlite (a file per setup in the temp folder) or a "
            "postgresql:// URL (each setup a site of its own, its rows deleted after).",
        ),
    ] = "sqlite",
    stall: Annotated[
        float, typer.Option("--stall-s", min=1.0, help="A drain ends when nothing new arrived for this long.")
    ] = 30.0,
    setup: Annotated[
        list[str] | None,
        typer.Option(
            "--setup", help="Only these setups (repeatable): uplink, uplink_capped, bridge, bridge_kill9."
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """After an outage at a fixed offered load: what the cloud holds (loss, duplicates), the drain
    rate and the time to empty, for the uplink uncapped and capped next to a plain Mosquitto bridge
    (its default queue; and an unbounded one whose edge broker is killed), in one run.

    Each setup has its own edge and cloud Mosquitto; the outages run at once, the drains one at a
    time. The defaults take about 8 minutes.
    """
    from outpost.benchmarks.uplink import SETUPS, UplinkBenchOptions, print_uplink, run_uplink_bench

    setups = tuple(setup) if setup else SETUPS
    if set(setups) - set(SETUPS):
        raise ConfigError(f"unknown setup {sorted(set(setups) - set(SETUPS))}; known: {', '.join(SETUPS)}")
    if db != "sqlite" and not db.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"--db must be sqlite or a postgresql:// URL, got {db[:80]!r}")
    options = UplinkBenchOptions(outage_s=outage, rate=rate, cap=cap, db=db, stall_s=stall, setups=setups)
    with Phases("bench uplink") as say:
        result = run_uplink_bench(options, progress=say)
    if json_out:
        print_json(result)
    else:
        print_uplink(result, stdout_console())


@bench_app.command("idle")
def idle(
    quick: QuickOpt = False,
    duration: Annotated[
        float | None, typer.Option("--duration", min=1.0, help="Seconds measured (30; --quick: 5).")
    ] = None,
    cloud: Annotated[
        bool,
        typer.Option(
            "--cloud/--no-cloud", help="A cloud broker of its own for the bridge and the uplink service."
        ),
    ] = True,
    json_out: JsonOpt = False,
) -> None:
    """What a site costs while nothing happens: CPU and wake-ups a second of every service and of
    Mosquitto, with nothing sent.

    Starts the real site (its own Mosquitto and every service, as ``outpost up``) and, unless
    --no-cloud, a cloud broker of its own; waits until every service is online, then measures.
    """
    from outpost.benchmarks.idle import IdleBenchOptions, print_idle, run_idle_bench

    kw: dict[str, Any] = {"cloud": cloud}
    if duration is not None:
        kw["duration_s"] = duration
    options = IdleBenchOptions.make(quick=quick, **kw)
    with Phases("bench idle") as say:
        result = run_idle_bench(options, progress=say)
    if json_out:
        print_json(result)
    else:
        print_idle(result, stdout_console())


def register(app: typer.Typer) -> None:
    """Add ``outpost bench`` and its commands to the root app."""
    app.add_typer(bench_app, name="bench")
