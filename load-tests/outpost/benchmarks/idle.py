"""The idle benchmark: what a site costs while nothing happens.

A gateway spends most of its life waiting for the next reading, and on a Jetson every wake-up of a
core costs power and every per cent of a core is taken from the models. A service that polls (a
timer every few milliseconds to look for a partial batch, a commit, a retry) costs that even at
rest. Outpost's network threads sleep until something is due instead (:meth:`outpost.bus.Bus.call_later`).

One run, one fresh site (:class:`outpost.stack.Stack`: its own Mosquitto and every service, as
``outpost up`` runs them) and, unless ``cloud`` is off, a cloud Mosquitto of its own that the
site's bridge and the uplink service use (so the uplink runs as a site with a cloud runs it; the
cloud broker's own figures are shown apart and left out of the totals). Once every service says
``online`` and ``settle_s`` have passed, nothing is sent for ``duration_s``; per process:

* **CPU**: user + system seconds over the window, as % of one core;
* **wake-ups/s**: voluntary context switches of all its threads (``/proc/PID/task/*/status``):
  each is a thread that went to sleep and was woken again, by a timer, a packet or a hand-off;
* its threads.

The machine's load is recorded (``machine``): the benchmark shares its cores with whatever else runs,
and another program's load shows as nothing here but may delay what it measures.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
from rich.console import Console
from rich.table import Table

from outpost.benchmarks.ingest import machine
from outpost.benchmarks.mqtt import connect, paho_client, subscribe
from outpost.benchmarks.phase import BenchError, stack_pids, wait_ready, workdir
from outpost.broker import Mosquitto
from outpost.services.registry import OutpostSettings
from outpost.settings import BrokerSettings
from outpost.stack import Stack

SITE = "bench-idle"
CLOUD = "cloud broker"
"""The row of the cloud's Mosquitto: not the site's, so not in the totals."""

Progress = Callable[[str], None]


@dataclass(frozen=True)
class IdleBenchOptions:
    duration_s: float = 30.0
    settle_s: float = 5.0  # after every service is online: start-up work (models, first commits) ends
    cloud: bool = True  # a cloud broker for the bridge and the uplink service

    @classmethod
    def make(cls, *, quick: bool = False, **kw: Any) -> IdleBenchOptions:
        if quick:
            kw.setdefault("duration_s", 5.0)
            kw.setdefault("settle_s", 1.0)
        return cls(**kw)


@dataclass(frozen=True)
class Usage:
    cpu_s: float
    wakeups: int
    threads: int


def usage(pid: int) -> Usage | None:
    """CPU seconds and voluntary context switches of every thread of ``pid`` (None: it is gone).
    psutil's ``num_ctx_switches`` reads the main thread's alone, and a service's network thread is
    not its main thread."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    wakeups = threads = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            text = (task / "status").read_text()
        except OSError:
            continue  # a thread that ended meanwhile
        threads += 1
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                wakeups += int(line.split()[1])
    return Usage(float(t.user + t.system), wakeups, threads)


def wait_online(
    settings: OutpostSettings, services: set[str], timeout_s: float, alive: Callable[[], str | None]
) -> None:
    """Until every service's retained status says ``online`` (a subscriber of the bench's own,
    gone before the measurement starts)."""
    topics = settings.topics
    online: set[str] = set()

    def on_status(_c: Any, _u: Any, msg: Any) -> None:
        if msg.payload:
            doc = orjson.loads(msg.payload)
            if doc.get("state") == "online":
                online.add(str(doc.get("service")))

    client = paho_client(f"{SITE}-watch")
    client.on_message = on_status
    connect(client, settings.mqtt.host, settings.mqtt.port)
    try:
        subscribe(client, [(topics.all_service_status, 1)])

        def all_online() -> bool:
            client.loop(0.1)
            return online >= services

        wait_ready(f"every service online ({', '.join(sorted(services))})", all_online, timeout_s, alive)
    finally:
        client.disconnect()


def run_idle_bench(options: IdleBenchOptions, progress: Progress | None = None) -> dict[str, Any]:
    say = progress or (lambda _m: None)
    started = time.monotonic()
    result: dict[str, Any] = {"bench": "idle", "machine": machine(), "options": asdict(options)}
    with workdir("outpost-bench-idle-") as work:
        result.update(_run(options, work, say))
    result["summary"] = summarize(result)
    result["machine"]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    return result


def _run(o: IdleBenchOptions, work: Path, say: Progress) -> dict[str, Any]:
    settings = OutpostSettings(
        site=SITE, data_dir=work / "data", log_level="WARNING", broker=BrokerSettings(auth=False)
    )
    services = set(type(settings).SERVICES)
    env: dict[str, str] = {}
    cloud: Mosquitto | None = None
    stack: Stack | None = None
    try:
        if o.cloud:
            cloud = Mosquitto(
                work / "cloud-broker", settings=BrokerSettings(auth=False), die_with_parent=True
            )
            cloud.start()
            settings.uplink.cloud = cloud.address
            env["OUTPOST_UPLINK__CLOUD"] = cloud.address
        stack = Stack(settings, env=env)
        say(
            f"starting the site (Mosquitto, {', '.join(sorted(services))})"
            + (" and a cloud broker" if cloud else "")
        )
        stack.start()
        running = stack

        def dead() -> str | None:
            for row in running.supervisor.status() if running.supervisor is not None else []:
                if row["state"] != "running":  # stopped, or restarting after a crash
                    return f"{row['service']} is {row['state']} ({row.get('reason') or row.get('last_exit')})"
            return None

        wait_online(settings, services, 180, dead)
        say(f"every service online; settling {o.settle_s:g} s, then {o.duration_s:g} s with nothing sent")
        time.sleep(o.settle_s)
        pids = {role: pid for role, pid in stack_pids(stack).items() if pid is not None}
        if cloud is not None and cloud.proc is not None:
            pids[CLOUD] = cloud.proc.pid
        t0 = time.perf_counter()
        before = {role: usage(pid) for role, pid in pids.items()}
        time.sleep(o.duration_s)
        after = {role: usage(pid) for role, pid in pids.items()}
        dt = time.perf_counter() - t0
        final = stack.supervisor.status() if stack.supervisor is not None else []
    finally:
        if stack is not None:
            stack.stop()
        if cloud is not None:
            cloud.stop()
    processes: dict[str, dict[str, Any]] = {}
    for role in pids:
        a, b = before[role], after[role]
        if a is None or b is None:
            raise BenchError(f"{role} ended during the measurement")
        processes[role] = {
            "cpu_pct": round(100.0 * (b.cpu_s - a.cpu_s) / dt, 2),
            "wakeups_s": round((b.wakeups - a.wakeups) / dt, 1),
            "threads": b.threads,
        }
    restarts = {str(r["service"]): r["restarts"] for r in final}
    return {"window_s": round(dt, 2), "processes": processes, "restarts": restarts}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    site = {role: p for role, p in result["processes"].items() if role != CLOUD}
    services = {role: p for role, p in site.items() if role != "mosquitto"}
    return {
        "site_cpu_pct": round(sum(p["cpu_pct"] for p in site.values()), 2),
        "site_wakeups_s": round(sum(p["wakeups_s"] for p in site.values()), 1),
        "services_cpu_pct": round(sum(p["cpu_pct"] for p in services.values()), 2),
        "services_wakeups_s": round(sum(p["wakeups_s"] for p in services.values()), 1),
        "restarts": sum(int(n) for n in result["restarts"].values()),
    }


def print_idle(result: dict[str, Any], console: Console) -> None:
    o, s = result["options"], result["summary"]
    table = Table(title=f"A site at idle: {result['window_s']:g} s with nothing sent, per process")
    table.add_column("process")
    table.add_column("CPU, % of a core", justify="right")
    table.add_column("wake-ups/s", justify="right")
    table.add_column("threads", justify="right")
    for role, p in sorted(result["processes"].items(), key=lambda kv: (kv[0] == CLOUD, -kv[1]["cpu_pct"])):
        name = f"{role} (not the site's)" if role == CLOUD else role
        table.add_row(name, f"{p['cpu_pct']:.2f}", f"{p['wakeups_s']:,.1f}", str(p["threads"]))
    table.add_row(
        "the site (services + Mosquitto)", f"{s['site_cpu_pct']:.2f}", f"{s['site_wakeups_s']:,.1f}", ""
    )
    console.print(table)
    console.print(
        f"cloud configured: {'yes' if o['cloud'] else 'no'}; restarts: {s['restarts']}; "
        f"load average before/after: {result['machine']['load_avg_1m_before']}/"
        f"{result['machine']['load_avg_1m_after']}"
    )
