"""``outpost up``, ``outpost demo`` and ``outpost status``: run the site, show it, report on it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from outpost.broker import port_open
from outpost.errors import BrokerError
from outpost.log import setup_logging
from outpost.monitor import SiteMonitor
from outpost.service import install_stop_signals
from outpost.services.registry import OutpostSettings, load_settings
from outpost.stack import Stack, parse_broker

console = Console()

BrokerOpt = Annotated[
    str | None, typer.Option("--broker", help="Use a running broker HOST:PORT instead of starting one.")
]
SiteOpt = Annotated[str | None, typer.Option("--site", help="Site id (default: OUTPOST_SITE or site file).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on the last line.")]


def _settings(site: str | None, data_dir: Path | None = None) -> OutpostSettings:
    overrides: dict[str, Any] = {}
    if site is not None:
        overrides["site"] = site
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    settings = load_settings(**overrides)
    setup_logging("WARNING" if settings.log_level == "INFO" else settings.log_level, json=settings.log_json)
    return settings


def _services_table(stack: Stack, mon: SiteMonitor) -> Table:
    t = Table(title=f"Outpost site {stack.settings.site!r} on broker {stack.broker_address}", expand=False)
    for col in ("service", "process", "pid", "restarts", "uptime s", "status (MQTT)"):
        t.add_column(col)
    assert stack.supervisor is not None
    for row in stack.supervisor.status():
        name = str(row["service"])
        t.add_row(
            name,
            str(row["state"]),
            str(row["pid"] or "-"),
            str(row["restarts"]),
            str(row["uptime_s"]),
            str(mon.status.get(name, {}).get("state", "-")),
        )
    return t


def _flow_table(mon: SiteMonitor, sent: int | None = None, bad: int | None = None) -> Table:
    s = mon.summary()
    t = Table(title="Flow", expand=False)
    t.add_column("figure")
    t.add_column("value", justify="right")
    if sent is not None:
        t.add_row("good readings sent (simulator)", f"{sent:,}")
    if bad is not None:
        t.add_row("bad payloads sent (simulator)", f"{bad:,}")
    t.add_row("validated events", f"{s['validated']:,}")
    t.add_row("events/s (last 5 s)", f"{mon.rate():,.0f}")
    t.add_row("rejected (DLQ)", f"{s['rejected']:,}")
    for reason, n in s["rejected_by_reason"].items():
        t.add_row(f"  {reason}", f"{n:,}")
    t.add_row("latency p50 / p99 ms", f"{s['latency_ms']['p50']:.1f} / {s['latency_ms']['p99']:.1f}")
    t.add_row("devices online / seen", f"{s['devices_online']} / {s['devices_seen']}")
    c = s["ingest_counters"]
    if c:
        t.add_row(
            "ingest: gaps / late / duplicates",
            f"{c.get('gaps', 0)} / {c.get('late', 0)} / {c.get('rejected.duplicate', 0)}",
        )
    t.add_row("scores (inference)", f"{s['scores']:,}")
    for model, n in s["scores_by_model"].items():
        t.add_row(f"  {model}", f"{n:,} ({s['alerts'].get(model.split('@')[0], 0):,} alerts)")
    for label, n in s["score_labels"].items():
        t.add_row(f"    {label}", f"{n:,}")
    t.add_row(
        "reading -> score p50 / p99 ms",
        f"{s['score_latency_ms']['p50']:.1f} / {s['score_latency_ms']['p99']:.1f}",
    )
    mem = s["memory_counters"]
    if mem:
        t.add_row("logged entries (memory; outpost log)", f"{mem.get('entries', 0):,}")
    return t


def up(
    broker: BrokerOpt = None,
    site: SiteOpt = None,
    data_dir: Annotated[Path | None, typer.Option(help="Durable state (default: OUTPOST_DATA_DIR).")] = None,
) -> None:
    """Start the broker (unless --broker) and every service, supervised, until Ctrl-C or SIGTERM."""
    settings = _settings(site, data_dir)
    if broker:
        parse_broker(broker)
    stop = threading.Event()
    install_stop_signals(stop)
    with Stack(settings, external_broker=broker) as stack:
        # said at once and plainly, so a stack run in the background (output to a file) tells
        # where its broker listens; the live table below refreshes only on a terminal
        console.print(
            f"Outpost site {settings.site!r}: broker {settings.mqtt.host}:{settings.mqtt.port}, "
            f"data in {stack.data_dir}, uplink {settings.uplink.cloud or 'none'}; Ctrl-C or SIGTERM stops it",
            soft_wrap=True,
        )
        mon = SiteMonitor(
            settings.mqtt, settings.topics, client_id=f"outpost-up-{os.getpid()}", watch_events=False
        )
        mon.start()
        try:
            with Live(
                _services_table(stack, mon),
                console=console,
                refresh_per_second=2,
                auto_refresh=console.is_terminal,
            ) as live:
                while not stop.wait(0.5):
                    live.update(_services_table(stack, mon))
        finally:
            mon.stop()
    # the live table above shows the last moment before the stop; say how each service ended
    exits = {str(r["service"]): r["last_exit"] for r in stack.final_status}
    if all(code == 0 for code in exits.values()):
        console.print(f"\nstopped cleanly ({', '.join(f'{n} exit 0' for n in exits) or 'nothing ran'})")
    else:
        shown = ", ".join(f"{n} exit {code}" for n, code in exits.items())
        console.print(f"\nstopped, not cleanly: {shown} (logs in {stack.data_dir / 'logs'})")
        raise typer.Exit(1)


def _run_sim(
    settings: OutpostSettings, address: str, args: dict[str, Any], log_path: Path
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "outpost.cli.main",
        "sim",
        "--broker",
        address,
        "--site",
        settings.site,
        "--prefix",
        settings.prefix,
        "--json",
    ]
    for key, value in args.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    err = log_path.open("ab")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
    err.close()
    return proc


def _sim_report(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    out = proc.stdout.read() if proc.stdout else b""
    proc.wait()
    for line in reversed(out.decode(errors="replace").strip().splitlines()):
        with contextlib.suppress(orjson.JSONDecodeError):
            doc = orjson.loads(line)
            if isinstance(doc, dict):
                return doc
    return {}


def demo(
    duration: Annotated[float, typer.Option(help="Seconds the simulator runs.", min=1)] = 60.0,
    devices: Annotated[int, typer.Option(help="Simulated devices.", min=1)] = 40,
    rate: Annotated[float, typer.Option(help="Readings/s offered by the simulator.", min=1)] = 2000.0,
    bad_ratio: Annotated[float, typer.Option(help="Fraction of bad payloads.", min=0, max=1)] = 0.02,
    seed: Annotated[int, typer.Option(help="Simulator seed (reproducible runs).")] = 7,
    broker: BrokerOpt = None,
    site: SiteOpt = None,
    json_out: JsonOpt = False,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the demo's state folder (logs, databases) afterwards.")
    ] = False,
) -> None:
    """Start the stack with the retail simulator, show it live, then summarize and stop everything."""
    settings = _settings(site or "demo")
    tmp = Path(tempfile.mkdtemp(prefix="outpost-demo-"))
    tmp.chmod(0o755)  # the broker drops to the user mosquitto and must reach its data folder
    settings.data_dir = tmp
    stop = threading.Event()
    install_stop_signals(stop)
    summary: dict[str, Any] = {}
    with Stack(settings, external_broker=broker) as stack:
        mon = SiteMonitor(settings.mqtt, settings.topics, client_id=f"outpost-demo-{os.getpid()}")
        mon.start()
        sim: subprocess.Popen[bytes] | None = None
        try:
            deadline = time.monotonic() + 30
            assert stack.supervisor is not None
            names = list(stack.supervisor.services)
            while any(mon.status.get(n, {}).get("state") != "online" for n in names):
                if time.monotonic() > deadline or stop.is_set():
                    waiting = [n for n in names if mon.status.get(n, {}).get("state") != "online"]
                    raise BrokerError(
                        f"{', '.join(waiting)} did not come online within 30 s; see {tmp / 'logs'}"
                    )
                time.sleep(0.1)
            sim = _run_sim(
                settings,
                stack.broker_address,
                {
                    "scenario": "retail",
                    "devices": devices,
                    "rate": rate,
                    "duration": duration,
                    "seed": seed,
                    "bad_ratio": bad_ratio,
                    "qos": 1,
                },
                tmp / "sim.log",
            )
            live_on = console.is_terminal and not json_out
            with Live(
                Group(_services_table(stack, mon), _flow_table(mon)),
                console=console,
                refresh_per_second=2,
                auto_refresh=live_on,
                transient=False,
            ) as live:
                while sim.poll() is None and not stop.wait(0.5):
                    if live_on:
                        live.update(Group(_services_table(stack, mon), _flow_table(mon)))
                if stop.is_set() and sim.poll() is None:
                    sim.send_signal(signal.SIGTERM)
                report = _sim_report(sim)
                _settle(mon)
                # Stop the services while the monitor listens: each drains and publishes its final
                # metrics and a retained "stopped", so the summary's service counters are final.
                stack.supervisor.stop()
                _wait_for(lambda: all(mon.status.get(n, {}).get("state") == "stopped" for n in names), 15)
                sent = int(report.get("sent_readings", 0) or 0)
                bad = int(report.get("bad_total", 0) or 0)
                live.update(Group(_services_table(stack, mon), _flow_table(mon, sent, bad)))
            summary = {"sent": sent, "sim": report, **mon.summary()}
            rows = stack.supervisor.status()
            summary["restarts"] = {r["service"]: r["restarts"] for r in rows}
            summary["exit_codes"] = {r["service"]: r["last_exit"] for r in rows}
        finally:
            if sim is not None and sim.poll() is None:
                sim.kill()
            mon.stop()
    # clean: every service drained and exited 0 on SIGTERM, and the stack's broker is gone
    summary["stopped_cleanly"] = bool(summary.get("exit_codes")) and all(
        code == 0 for code in summary["exit_codes"].values()
    )
    console.print()  # rich's live view leaves the cursor at the end of its last line
    # a demo that ran cleanly leaves nothing behind (a run of 20 s is ~100 MB); one that did not
    # keeps its logs for a look
    removed = summary["stopped_cleanly"] and not keep
    if removed:
        shutil.rmtree(tmp, ignore_errors=True)
    summary["state_dir"] = None if removed else str(tmp)
    if json_out:
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    else:
        where = "its state was removed (--keep keeps it)" if removed else f"state is in {tmp}"
        console.print(
            f"[green]demo finished[/]: {summary['sent']:,} sent, {summary['validated']:,} validated, "
            f"{summary['rejected']:,} rejected; everything stopped, {where}"
        )


def _wait_for(pred: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _settle(mon: SiteMonitor, quiet_s: float = 1.5, limit_s: float = 15.0) -> None:
    """Wait until events and dead letters stop arriving (the tail of the run drains)."""
    deadline = time.monotonic() + limit_s
    last = -1
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        s = mon.summary()
        now_total = s["validated"] + s["rejected"]
        if now_total != last:
            last, quiet_since = now_total, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
        time.sleep(0.1)


def status(
    broker: Annotated[
        str | None,
        typer.Option("--broker", help="The site's broker, HOST:PORT (default: the configured one)."),
    ] = None,
    site: SiteOpt = None,
    wait_s: Annotated[float, typer.Option("--wait", help="Seconds to listen for metrics.", min=0.5)] = 6.0,
    json_out: JsonOpt = False,
) -> None:
    """Show each service's retained status and latest metrics, read from the broker."""
    settings = _settings(site)
    if broker:
        settings.mqtt.host, settings.mqtt.port = parse_broker(broker)
    if not port_open(settings.mqtt.host, settings.mqtt.port, timeout=2):
        raise BrokerError(f"no broker at {settings.mqtt.host}:{settings.mqtt.port}")
    mon = SiteMonitor(
        settings.mqtt, settings.topics, client_id=f"outpost-status-{os.getpid()}", watch_events=False
    )
    mon.start()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and (not mon.status or set(mon.status) - set(mon.metrics)):
        time.sleep(0.1)
    mon.stop()
    t = Table(title=f"site {settings.site!r} at {settings.mqtt.host}:{settings.mqtt.port}")
    for col in ("service", "state", "version", "config", "pid", "key counters"):
        t.add_column(col)
    out: dict[str, Any] = {"site": settings.site, "services": {}}
    for name, st in sorted(mon.status.items()):
        counters = mon.metrics.get(name, {}).get("counters", {})
        shown = ", ".join(f"{k}={v}" for k, v in list(counters.items())[:6])
        state = str(st.get("state"))
        if st.get("health") == "degraded":
            state += " (degraded: " + "; ".join(st.get("problems") or []) + ")"
        t.add_row(
            name,
            state,
            str(st.get("version")),
            str(st.get("config_hash")),
            str(st.get("pid")),
            shown,
        )
        out["services"][name] = {"status": st, "metrics": mon.metrics.get(name)}
    console.print(t if mon.status else "no service has reported on this site")
    if json_out:
        sys.stdout.write(orjson.dumps(out).decode() + "\n")


def register(app: typer.Typer) -> None:
    app.command()(up)
    app.command()(demo)
    app.command()(status)
