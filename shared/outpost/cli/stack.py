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

from outpost.broker import can_listen, free_port, port_open
from outpost.cli.output import JsonOpt, print_json
from outpost.cli.site import DataDirOpt, SiteBrokerOpt, SiteOpt, Where, find_site
from outpost.containers import site_containers
from outpost.datadir import site_path
from outpost.errors import BrokerError, OutpostError
from outpost.log import setup_logging
from outpost.monitor import SiteMonitor
from outpost.service import install_stop_signals
from outpost.services.connectors.secrets import SecretStore
from outpost.services.registry import OutpostSettings
from outpost.services.telemetry.page.settings import page_url
from outpost.sim.shop import ShopPeers
from outpost.stack import Stack, parse_broker
from outpost.tsdb import VictoriaMetrics

console = Console()

RunningBrokerOpt = Annotated[
    str | None, typer.Option("--broker", help="Use a running broker HOST:PORT instead of starting one.")
]


def _settings(where: Where) -> OutpostSettings:
    settings = where.settings
    setup_logging("WARNING" if settings.log_level == "INFO" else settings.log_level, json=settings.log_json)
    return settings


def _services_table(stack: Stack, mon: SiteMonitor) -> Table:
    page = f", status page {stack.status_page}" if stack.status_page else ""
    t = Table(
        title=f"Outpost site {stack.settings.site!r} on broker {stack.broker_address}{page}", expand=False
    )
    for col in ("service", "process", "pid", "restarts", "uptime s", "MQTT status", "said last"):
        t.add_column(col, overflow="fold")
    assert stack.supervisor is not None
    for row in stack.supervisor.status():
        name = str(row["service"])
        st = mon.status.get(name, {})
        shown = str(st.get("state", "-"))
        if st.get("health") == "degraded":
            shown += " (degraded)"
        said = str(row["reason"] or "")
        if row["log_error"]:
            said = f"{said} [{row['log_error']}]" if said else str(row["log_error"])
        process = str(row["state"])
        if process == "stopped" and row["last_exit"] is not None:
            process += f" (exit {row['last_exit']})"  # at the end: it ran, and how it ended
        t.add_row(
            name,
            process,
            str(row["pid"] or "-"),
            str(row["restarts"]),
            str(row["uptime_s"]),
            shown,
            said[:300],
        )
    return t


def _ended(stack: Stack) -> bool:
    """Say how each service ended (the live table shows the last moment before the stop); True
    when every one exited 0."""
    rows = stack.final_status
    if all(r["last_exit"] == 0 for r in rows):
        names = ", ".join(f"{r['service']} exit 0" for r in rows) or "nothing ran"
        console.print(f"\nstopped cleanly ({names})")
        return True
    console.print(f"\nstopped, not cleanly (logs in {stack.log_dir}):", soft_wrap=True)
    for r in rows:
        line = f"  {r['service']}: exit {r['last_exit']}"
        if r["last_exit"] != 0:
            line += f": {r['reason']}"
        if r["log_error"]:
            line += f" ({r['log_error']})"
        console.print(line, soft_wrap=True, markup=False, highlight=False)
    return False


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


def _agents_table(mon: SiteMonitor) -> Table:
    """Each agent's decisions, escalations (open), actions and override rate, as the agent service
    reports them (control/agents/reported); ``outpost agents list`` shows more."""
    t = Table(title="Agents", expand=False)
    for col in ("agent", "state", "decisions", "escalations (open)", "actions", "override rate"):
        t.add_column(col, justify="left" if col in ("agent", "state") else "right")
    for name, a in mon.agents_summary().items():
        rate = a["override_rate"]
        t.add_row(
            name,
            str(a["state"]),
            f"{a['decisions']:,}",
            f"{a['escalations']:,} ({a['escalations_open']:,})",
            f"{a['actions']:,}",
            "-" if rate is None else f"{rate:.0%}",
        )
    return t


def _actions_table(mon: SiteMonitor) -> Table:
    """The gateway's outcomes by connector, and the cost of its calls (``outpost actions list``
    shows each request)."""
    t = Table(title="Actions", expand=False)
    for col in ("connector", "done", "duplicate", "failed", "expired", "refused", "cost"):
        t.add_column(col, justify="left" if col == "connector" else "right")
    for name, a in mon.actions_summary().items():
        o = a["outcomes"]
        t.add_row(
            name,
            *(f"{o.get(k, 0):,}" for k in ("done", "duplicate", "failed", "expired", "refused")),
            f"{a['cost']:.2f}",
        )
    return t


def _live(stack: Stack, mon: SiteMonitor, sent: int | None = None, bad: int | None = None) -> Group:
    return Group(
        _services_table(stack, mon), _flow_table(mon, sent, bad), _agents_table(mon), _actions_table(mon)
    )


def status_page(settings: OutpostSettings) -> tuple[str | None, dict[str, str]]:
    """Where the telemetry service will serve the status page, and the services' environment that
    says so: with ``telemetry.page.port`` 0, or a port something else holds already (a second site
    on the gateway, another program), a free port is picked here, so the address is known (and
    printed, and in the run file) before the service starts. (None, {}) when the page is off."""
    page = settings.telemetry.page
    if not page.enabled:
        return None, {}
    if page.port and can_listen(page.host, page.port):
        return page_url(page.host, page.port), {}
    port = free_port()  # where page.port was in use, up's first line says so (_page_said)
    return page_url(page.host, port), {"OUTPOST_TELEMETRY__PAGE__PORT": str(port)}


def _page_said(settings: OutpostSettings, page: str | None, env: dict[str, str]) -> str:
    """The status page's address as ``up`` states it, with why it is not the configured port (said
    once the site has started: a second ``up`` on the same folder is refused first, not told
    about a port its twin holds)."""
    configured = settings.telemetry.page.port
    if page is None:
        return "none"
    return f"{page} (port {configured} was in use)" if env and configured else page


def up(
    broker: RunningBrokerOpt = None,
    site: SiteOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Start the broker (unless --broker) and every service, supervised, until Ctrl-C or SIGTERM.
    It owns the data folder while it runs (a second one there is refused) and writes its run file,
    through which every other command finds the site."""
    settings = _settings(find_site(data_dir, site))
    if broker is not None:  # "" too: a script's unset variable is not "start our own"
        parse_broker(broker)
    stop = threading.Event()
    install_stop_signals(stop)
    page, env = status_page(settings)
    with Stack(settings, external_broker=broker, env=env, status_page=page) as stack:
        # said at once and plainly, so a stack run in the background (output to a file) tells
        # where its broker and status page listen; the live table below refreshes only on a terminal
        console.print(
            f"Outpost site {settings.site!r}: broker {settings.mqtt.host}:{settings.mqtt.port}, "
            f"status page: {_page_said(settings, page, env)}, "
            f"state in {stack.site_dir}, uplink {settings.uplink.cloud or 'none'}, PID {os.getpid()}; "
            "Ctrl-C or SIGTERM stops it",
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
    if not _ended(stack):
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
        "--data-dir",  # the devices find their credentials in the site's folder
        str(settings.data_dir),
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
    broker: RunningBrokerOpt = None,
    site: SiteOpt = None,
    json_out: JsonOpt = False,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the demo's state folder (logs, databases) afterwards.")
    ] = False,
) -> None:
    """Start the stack with the retail simulator, show it live, then summarize and stop everything.
    It runs in a temporary data folder of its own, whatever --data-dir says."""
    settings = _settings(find_site(None, site or "demo"))
    tmp = Path(tempfile.mkdtemp(prefix="outpost-demo-"))
    tmp.chmod(0o755)  # the broker drops to the user mosquitto and must reach its data folder
    settings.data_dir = tmp
    stop = threading.Event()
    install_stop_signals(stop)
    summary: dict[str, Any] = {}
    # the shop's own systems, which the retail agents act on through the connector gateway
    shop = ShopPeers().start()
    SecretStore(site_path(tmp, settings.site, "connectors")).set(ShopPeers.SECRET, shop.api.client_secret)
    env = {"OUTPOST_CONNECTORS__DECLARED": orjson.dumps(shop.connectors()).decode()}
    # a real time-series server for the telemetry service to write to (docs/telemetry.md)
    tsdb = VictoriaMetrics(tmp / "tsdb", die_with_parent=True).start()
    env |= {"OUTPOST_TELEMETRY__INFLUX__URL": tsdb.url, "OUTPOST_TELEMETRY__ROLLUP_S": "5"}
    page, page_env = status_page(settings)
    env |= page_env
    with (
        contextlib.ExitStack() as cleanup,
        Stack(settings, external_broker=broker, env=env, status_page=page) as stack,
    ):
        cleanup.callback(tsdb.stop)
        cleanup.callback(shop.stop)
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
                    said = "; ".join(
                        f"{r['service']}: {r['reason']}" for r in stack.supervisor.status() if r["reason"]
                    )
                    raise BrokerError(
                        f"{', '.join(waiting)} did not come online within 30 s"
                        + (f" ({said})" if said else "")
                        + f"; see {stack.log_dir}"
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
                _live(stack, mon),
                console=console,
                refresh_per_second=2,
                auto_refresh=live_on,
                transient=False,
            ) as live:
                while sim.poll() is None and not stop.wait(0.5):
                    if live_on:
                        live.update(_live(stack, mon))
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
                live.update(_live(stack, mon, sent, bad))
            summary = {"sent": sent, "sim": report, **mon.summary(), "peers": shop.summary()}
            rows = stack.supervisor.status()
            summary["restarts"] = {r["service"]: r["restarts"] for r in rows}
            summary["exit_codes"] = {r["service"]: r["last_exit"] for r in rows}
            summary["telemetry"] = _telemetry_written(tsdb, settings.site)
            summary["status_page"] = page
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
        agents = summary.get("agents") or {}
        decided = ", ".join(
            f"{name} {a['decisions']:,} decisions / {a['actions']:,} actions / "
            f"{a['escalations']:,} escalations"
            for name, a in agents.items()
        )
        acted = ", ".join(
            f"{name} " + " / ".join(f"{n:,} {outcome}" for outcome, n in sorted(a["outcomes"].items()))
            for name, a in (summary.get("actions") or {}).items()
        )
        console.print(
            f"[green]demo finished[/]: {summary['sent']:,} sent, {summary['validated']:,} validated, "
            f"{summary['rejected']:,} rejected"
            + (f"; agents: {decided}" if decided else "")
            + (f"; actions: {acted}" if acted else "")
            + (
                f"; telemetry: {tel['points']:,} points of {len(tel['measurements'])} measurements, "
                f"{tel['bytes_upstream']:,} bytes upstream"
                if (tel := summary.get("telemetry"))
                else ""
            )
            + f"; everything stopped, {where}"
        )


def _telemetry_written(tsdb: VictoriaMetrics, site: str) -> dict[str, Any] | None:
    """What the telemetry service wrote to the demo's time-series server: points (one per field
    value), bytes the server read (on the wire, HTTP included) and the measurements seen."""
    from outpost.services.telemetry.catalog import MEASUREMENTS

    try:
        series = tsdb.export(f'{{site="{site}"}}')
        wire = tsdb.bytes_received()
    except OutpostError:
        return None
    names = {s["metric"].get("__name__", "") for s in series}
    found = sorted({m for m in MEASUREMENTS for n in names if n.startswith(m + "_")})
    return {
        "points": sum(len(s["values"]) for s in series),
        "bytes_upstream": wire,
        "measurements": found,
    }


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
    broker: SiteBrokerOpt = None,
    site: SiteOpt = None,
    data_dir: DataDirOpt = None,
    wait_s: Annotated[float, typer.Option("--wait", help="Seconds to listen for metrics.", min=0.5)] = 6.0,
    json_out: JsonOpt = False,
) -> None:
    """Each service's state, health and problems, throughput and dead letters by reason, and the
    uplink with its backlog, read from the site's broker. Exit 1 when no service reports there."""
    where = find_site(data_dir, site, broker)
    settings = _settings(where)
    looked = (
        f"site {where.site!r} (from {where.site_from}) at broker {where.broker} (from {where.broker_from})"
    )
    if not port_open(settings.mqtt.host, settings.mqtt.port, timeout=2):
        error = (
            f"no broker at {where.broker}: looked for {looked}; {where.running()}. Start the site with "
            "`outpost up`, or give --broker HOST:PORT or the --data-dir it runs in"
        )
        if json_out:  # a script reads the last line: one object there, the error in it
            print_json({"site": where.site, "broker": where.broker, "error": error, "services": {}})
        raise BrokerError(error)
    mon = SiteMonitor(
        settings.mqtt, settings.topics, client_id=f"outpost-status-{os.getpid()}", watch_events=False
    )
    mon.start()
    deadline = time.monotonic() + wait_s
    # two metrics snapshots of each service give its current throughput; one will do at the deadline
    while time.monotonic() < deadline and (not mon.status or set(mon.status) - set(mon.previous_metrics)):
        time.sleep(0.1)
    mon.stop()
    report = status_report(mon, where)
    found = site_containers()
    report["containers"] = None if found is None else [c.as_dict() for c in found]
    if not mon.status:
        err = Console(stderr=True)
        err.print(
            f"nothing reports on {looked}; {where.running()}. Try --site (the site `outpost up` printed), "
            "--broker HOST:PORT, or --data-dir of the running site (`outpost data where` shows what "
            "the commands find)",
            soft_wrap=False,
            markup=False,
            highlight=False,
        )
        if json_out:
            print_json(report)
        raise typer.Exit(1)
    print_status(report)
    if json_out:
        print_json(report)


def _mb(n: int) -> str:
    mb = n / 1e6
    return f"{mb:,.0f}" if mb >= 10 else f"{mb:.2g}"


def _outbox(state: dict[str, Any], counters: dict[str, int]) -> dict[str, Any]:
    """The uplink's outbox against its disk budget, and what the budget and the age limit cost."""

    def per_stream(prefix: str) -> dict[str, int]:
        return {k.removeprefix(prefix): int(v) for k, v in counters.items() if k.startswith(prefix) and v}

    return {
        "bytes": state.get("outbox_bytes"),
        "records": state.get("outbox_records"),
        "budget_bytes": state.get("outbox_budget_bytes"),
        "over_budget": bool(state.get("outbox_over_budget")),
        "dropped": per_stream("uplink_dropped."),
        "expired": per_stream("uplink_expired."),
    }


def status_report(mon: SiteMonitor, where: Where) -> dict[str, Any]:
    """Everything ``outpost status`` shows, as the JSON it prints with ``--json``."""
    services: dict[str, Any] = {}
    dlq: dict[str, dict[str, int]] = {}
    uplink: dict[str, Any] | None = None
    for name, st in sorted(mon.status.items()):
        metrics = mon.metrics.get(name)
        counters: dict[str, int] = (metrics or {}).get("counters", {})
        reasons = {k.split(".", 1)[1]: int(v) for k, v in counters.items() if k.startswith("rejected.") and v}
        if reasons:
            dlq[name] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
        rate = mon.message_rate(name)
        started = st.get("started_ns")
        avg = None
        if metrics is not None and isinstance(started, int) and isinstance(metrics.get("ts"), int):
            up_s = (metrics["ts"] - started) / 1e9
            avg = counters.get("messages", 0) / up_s if up_s > 0 else None
        state = (metrics or {}).get("state", {})
        if name in ("memory", "uplink") and isinstance(state, dict):
            streams = state.get("uplink")
            if isinstance(streams, dict):  # the uplink's outpost.streams: {stream: {backlog, age_s}}
                uplink = {
                    "up": bool(state.get("uplink_up")),
                    "backlog": {k: v.get("backlog") for k, v in streams.items() if isinstance(v, dict)},
                    "age_s": {k: v.get("age_s") for k, v in streams.items() if isinstance(v, dict)},
                }
            elif state.get("sync") == "off" and uplink is None:
                uplink = {"up": None, "sync": "off", "backlog": {}}
            if name == "uplink" and uplink is not None and "outbox_bytes" in state:
                uplink["outbox"] = _outbox(state, counters)
        services[name] = {
            "state": st.get("state"),
            "health": st.get("health"),
            "problems": st.get("problems") or [],
            "reason": st.get("reason"),
            "pid": st.get("pid"),
            "version": st.get("version"),
            "config_hash": st.get("config_hash"),
            "messages": counters.get("messages", 0) if metrics is not None else None,
            "messages_per_s": None if rate is None else round(rate, 1),
            "messages_per_s_since_start": None if avg is None else round(avg, 1),
            "rejected": counters.get("rejected", 0) if metrics is not None else None,
            "metrics": metrics,
            "status": st,
        }
    return {
        "site": where.site,
        "broker": where.broker,
        "where": where.describe(),
        "services": services,
        "dlq": dlq,
        "uplink": uplink,
    }


def print_status(report: dict[str, Any]) -> None:
    """Tables narrow enough for 80 columns: long texts (problems, reasons) go on lines of their own.
    The terminal's width, or COLUMNS, or 80 when it is neither."""
    out = Console(highlight=False)
    w = report["where"]
    out.print(
        f"site {report['site']!r}, broker {report['broker']} (from {w['broker_from']})",
        markup=False,
        highlight=False,
    )
    t = Table(title=None, expand=False)
    for col, just in (("service", "left"), ("state", "left"), ("health", "left"), ("pid", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    t.add_column("msg/s", justify="right")
    t.add_column("messages", justify="right")
    t.add_column("DLQ", justify="right")
    notes: list[str] = []
    for name, s in report["services"].items():
        if s["metrics"] is None:
            rate, total, rejected = "no metrics yet", "", ""
        else:
            now = s["messages_per_s"]
            rate = f"{now:,.0f}" if now is not None else f"~{s['messages_per_s_since_start'] or 0:,.0f} avg"
            total, rejected = f"{s['messages']:,}", f"{s['rejected']:,}"
        t.add_row(name, str(s["state"]), str(s["health"] or "-"), str(s["pid"] or "-"), rate, total, rejected)
        for problem in s["problems"]:
            notes.append(f"{name}: {problem}")
        if s["reason"]:
            notes.append(f"{name}: {s['reason']}")
    out.print(t)
    for note in notes:
        out.print(f"  problem  {note}", markup=False, highlight=False)
    if report["dlq"]:
        d = Table(title="dead letters by reason, since start", expand=False)
        d.add_column("service")
        d.add_column("reason")
        d.add_column("count", justify="right")
        for name, reasons in report["dlq"].items():
            for reason, n in reasons.items():
                d.add_row(name, reason, f"{n:,}")
        out.print(d)
    else:
        out.print("dead letters: none")
    containers = report.get("containers")
    if containers:  # the site runs under docker compose (outpost.containers)
        out.print(
            "containers: "
            + "; ".join(
                f"{c['service'] or c['name']} {c['state']}"
                + (f", {c['health']}" if c["health"] else "")
                + (f", restarted {c['restarts']}x" if c["restarts"] else "")
                for c in containers
            ),
            markup=False,
            highlight=False,
        )
    up = report["uplink"]
    if up is None:
        out.print("uplink: no metrics from the uplink yet")
    elif up.get("sync") == "off":
        out.print("uplink: none (uplink.cloud is not set; memory sync off)")
    else:
        ages = up.get("age_s") or {}
        backlog = (
            ", ".join(
                f"{k} {v:,}" + (f" (oldest {ages[k]:,.0f} s)" if v and ages.get(k) is not None else "")
                for k, v in up["backlog"].items()
                if v is not None
            )
            or "none"
        )
        out.print(f"uplink: {'up' if up['up'] else 'DOWN'}; backlog not yet in the cloud: {backlog}")
        box = up.get("outbox")
        if box is not None:
            line = f"outbox: {box['records'] or 0:,} records, {_mb(box['bytes'] or 0)} MB"
            if box["budget_bytes"]:
                line += f" of a {_mb(box['budget_bytes'])} MB budget"
            if box["over_budget"]:
                line += " [red](over budget: only alerts left, kept)[/]"
            for what in ("dropped", "expired"):
                if box[what]:
                    line += f"; {what}: " + ", ".join(f"{k} {v:,}" for k, v in box[what].items())
            out.print(line)


def register(app: typer.Typer) -> None:
    app.command()(up)
    app.command()(demo)
    app.command()(status)
