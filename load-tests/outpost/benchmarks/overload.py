"""The overload benchmark: do other devices still get through while one device floods, or sends
large bad batches, and does every reading the bad device sent end up somewhere?

Every phase runs the real site (:class:`outpost.stack.Stack`: its own Mosquitto, ingest, inference
and memory, supervised, as ``outpost up`` runs them), fresh, so that a service's peak memory and its
counters belong to that phase alone. In each phase canary devices publish paced readings at QoS 1
from a process of their own, and a sink subscribed to their events only measures reading published ->
validated event received. After ``warmup_s`` the measurement window opens and the phase's load starts:

* ``baseline``: no load; the canaries' latency the others are compared with, in the same run;
* ``flood``: one device publishes ``flood_messages`` valid readings at QoS 0 as fast as the load
  generator goes: MQTT PUBLISH packets written straight to a socket (``flood_client`` ``raw``; or a
  paho loop, ``paho``; :mod:`outpost.benchmarks.load`); the offered rate is what it achieved, which
  with ``raw`` is how fast the broker reads;
* ``bad_batches``: one device publishes batches of ``bad_batch_items`` invalid readings, about
  ``bad_batch_bytes`` each, ``bad_batch_rate`` a second, at QoS 1.

When the window closes the load stops and the phase waits at most ``drain_s`` (its deadline, so a
site that falls over still ends the run) for every canary reading and for the load device's readings
to be accounted for, then stops the services (their last metrics batch is published on the way out).
What the phase reports:

* canary p50/p99 of readings stamped inside the window, and canary readings delivered / sent;
* the load device's readings: sent = validated events + dead-lettered readings, and the difference.
  A dead letter stands for ``count`` inputs, each one item of a batch where it names items and a
  whole message otherwise (refused whole, or shed unread in aggregate):
  :func:`outpost.benchmarks.sinks.dead_letter_items`. Ingest's ``shed`` counter is shown beside it
  (those messages are in the aggregates' counts already); a dead letter published twice is counted
  once and reported as a duplicate;
* ingest's ``rejected`` counter next to the sum of ``count`` over the ingest dead letters received
  (counters and DLQ agree?);
* every service's and the broker's peak RSS (``VmHWM`` from ``/proc/PID/status``, sampled every
  0.25 s so a restarted process is seen too), restarts, and ``offline`` statuses (the broker dropped a
  service: its last will);
* CPU per process over the window, as the other benchmarks do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from outpost.benchmarks.channels import Channels, spawn_context
from outpost.benchmarks.ingest import machine
from outpost.benchmarks.load import LoadSpec, run_publisher
from outpost.benchmarks.phase import (
    BenchError,
    Procs,
    cpu_between,
    drain_until,
    stack_pids,
    wait_ready,
    workdir,
)
from outpost.benchmarks.sinks import (
    AccountSpec,
    CanarySpec,
    run_account_sink,
    run_canary_sink,
    shed_counted,
)
from outpost.services.ingest.settings import IngestSettings
from outpost.services.registry import OutpostSettings
from outpost.settings import BrokerSettings
from outpost.stack import Stack

TARGET_P99_MS = 100.0
TARGET_INGEST_RSS_MB = 150.0
PHASES = ("baseline", "flood", "bad_batches")
CANARY_PREFIX = "canary"
LOAD_DEVICE = {"flood": "flood-00000", "bad_batches": "junk-00000"}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class OverloadOptions:
    duration_s: float = 10.0  # the measurement window of each phase; the load runs inside it
    warmup_s: float = 1.0  # canaries alone before the window opens
    canaries: int = 5
    canary_rate: float = 40.0  # readings/s of each canary
    flood_messages: int = 100_000  # QoS 0 messages of one reading the flooding device sends
    flood_client: str = "raw"  # raw: PUBLISH packets on a socket (the fastest); paho: a paho loop
    bad_batch_bytes: int = 1_000_000
    bad_batch_items: int = IngestSettings().max_batch  # as many as ingest takes: each one is looked at
    bad_batch_rate: float = 1.0  # bad batches a second
    drain_s: float = 30.0  # after the window, the longest wait for what is still on its way
    stall_s: float = 5.0  # ... or until nothing more arrived for this long
    metrics_interval_s: float = 1.0  # the services' telemetry.metrics_interval_s
    phases: tuple[str, ...] = PHASES


def run_overload_bench(options: OverloadOptions, *, progress: Progress | None = None) -> dict[str, Any]:
    """Run the phases, each on a fresh site in a temp dir, and return the figures."""
    say = progress or (lambda _m: None)
    started = time.monotonic()
    result: dict[str, Any] = {"bench": "overload", "machine": machine(), "options": asdict(options)}
    phases: dict[str, dict[str, Any]] = {}
    with workdir("outpost-bench-overload-") as work:
        for name in options.phases:
            if name not in PHASES:
                raise BenchError(f"unknown phase {name!r}; known: {', '.join(PHASES)}")
            if options.flood_client not in ("raw", "paho"):
                raise BenchError(f"flood_client must be raw or paho, got {options.flood_client!r}")
            say(f"{name}: starting the site")
            phases[name] = run_overload_phase(name, options, work / name, say)
            say(f"{name}: {_brief(phases[name])}")
    result["phases"] = phases
    result["summary"] = summarize(phases)
    result["machine"]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    return result


class _Peaks:
    """Peak RSS per service from ``/proc/PID/status`` (``VmHWM``: the process's own high-water mark),
    kept across restarts: a new pid of the same service adds its own peak to the record."""

    def __init__(self) -> None:
        self.mb: dict[str, float] = {}
        self.pids: dict[str, set[int]] = {}

    def sample(self, pids: dict[str, int | None]) -> None:
        for name, pid in pids.items():
            if pid is None:
                continue
            self.pids.setdefault(name, set()).add(pid)
            hwm = _vm_hwm_kb(pid)
            if hwm is not None:
                self.mb[name] = max(self.mb.get(name, 0.0), round(hwm / 1024, 1))


def _vm_hwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _load_spec(name: str, o: OverloadOptions, host: str, port: int, site: str) -> LoadSpec | None:
    base = LoadSpec(host=host, port=port, site=site, devices=1, client_id=f"bench-{name}-{site}")
    if name == "flood":
        # as fast as the generator goes: no window, QoS 0, a fixed number of messages
        raw = o.flood_client == "raw"
        return replace(base, qos=0, window=0, limit=o.flood_messages, device_prefix="flood", raw=raw)
    if name == "bad_batches":
        items = o.bad_batch_items
        return replace(
            base,
            qos=1,
            batch=items,
            rate=items * o.bad_batch_rate,
            window=10 * items,
            junk_bytes=o.bad_batch_bytes,
            device_prefix="junk",
        )
    return None


def run_overload_phase(name: str, o: OverloadOptions, workdir: Path, say: Progress) -> dict[str, Any]:
    """One phase on a fresh site; bounded in time whatever the site does."""
    workdir.mkdir(parents=True, exist_ok=True)
    site_file = workdir / "outpost.yaml"
    site_file.write_text("{}\n")  # the services must not pick up an outpost.yaml of the caller's
    site = f"ov-{name.replace('_', '-')}"
    settings = OutpostSettings(
        site=site, data_dir=workdir / "data", log_level="WARNING", broker=BrokerSettings(auth=False)
    )
    env = {
        "OUTPOST_CONFIG": str(site_file),
        "OUTPOST_TELEMETRY__METRICS_INTERVAL_S": str(o.metrics_interval_s),
    }
    stack = Stack(settings, env=env)
    ctx = spawn_context()
    can_ch, load_ch = Channels.create(ctx), Channels.create(ctx)
    procs: list[BaseProcess] = []
    peaks = _Peaks()
    cpu = Procs()
    results: dict[str, dict[str, Any] | None] = {}
    try:
        stack.start()
        host, port = settings.mqtt.host, settings.mqtt.port
        services = tuple(type(settings).SERVICES)
        canaries = tuple(f"{CANARY_PREFIX}-{i:05d}" for i in range(o.canaries))
        load = _load_spec(name, o, host, port, site)
        account = AccountSpec(
            host=host,
            port=port,
            site=site,
            services=services,
            canary_prefix=CANARY_PREFIX,
            load_device=LOAD_DEVICE.get(name, ""),
            load_per_msg=load.batch if load is not None else 1,
            client_id=f"bench-account-{site}",
        )
        canary_sink = CanarySpec(
            host=host, port=port, site=site, devices=canaries, client_id=f"bench-cs-{site}"
        )
        canary_load = LoadSpec(
            host=host,
            port=port,
            site=site,
            qos=1,
            devices=o.canaries,
            rate=o.canaries * o.canary_rate,
            window=5000,  # in flight at most (paced: the rate is the rate); queued beyond it
            client_id=f"bench-canaries-{site}",
            device_prefix=CANARY_PREFIX,
        )
        roles: list[tuple[str, Any, Any, Channels]] = [
            ("account_sink", run_account_sink, account, load_ch),
            ("canary_sink", run_canary_sink, canary_sink, can_ch),
            ("canary_load", run_publisher, canary_load, can_ch),
        ]
        if load is not None:
            roles.append((f"{name}_load", run_publisher, load, load_ch))
        for role, fn, spec, ch in roles:
            p = ctx.Process(target=fn, args=(spec, ch), name=role, daemon=True)
            p.start()
            procs.append(p)
            cpu.add(role, p.pid)

        def dead() -> str | None:
            for q in procs:
                if q.exitcode is not None:
                    return f"{q.name} exited with {q.exitcode}"
            return None

        wait_ready("the sinks", lambda: load_ch.sink_ready.is_set() and can_ch.sink_ready.is_set(), 30, dead)
        wait_ready("every service online", load_ch.service_ready.is_set, 60, dead)
        wait_ready(
            "the publishers",
            lambda: can_ch.pub_ready.is_set() and (load is None or load_ch.pub_ready.is_set()),
            30,
            dead,
        )
        for role, pid in stack_pids(stack).items():
            cpu.add(role, pid)

        can_ch.go.value = 1
        _sleep_sampling(o.warmup_s, stack, peaks)
        can_ch.lat_from.value = time.time_ns()
        say(
            f"{name}: window open ({o.duration_s:g} s)"
            + (f", {load.device_prefix} device starts" if load else "")
        )
        a = cpu.sample(can_ch)
        load_ch.go.value = 1
        _sleep_sampling(o.duration_s, stack, peaks)
        b = cpu.sample(can_ch)
        can_ch.lat_to.value = time.time_ns()
        can_ch.stop_pub.value = load_ch.stop_pub.value = 1
        for publisher in procs[2:]:
            _join_sampling(publisher, 30.0, stack, peaks)
        can_res = can_ch.take_results(1, 5)  # the publishers report first, the sinks when stopped
        load_res = load_ch.take_results(1, 5) if load is not None else {}
        canary_sent = can_ch.sent.value
        load_sent = load_ch.sent.value
        drained = _drain(o, can_ch, canary_sent, load_ch, load_sent if load is not None else 0, stack, peaks)
        peaks.sample(stack_pids(stack))
        final = stack.supervisor.status() if stack.supervisor is not None else []
        if stack.supervisor is not None:
            stack.supervisor.stop(grace_s=10.0)  # their last metrics batch goes out on the way
        time.sleep(0.5)
        can_ch.stop_sink.value = load_ch.stop_sink.value = 1
        can_res.update(can_ch.take_results(2 - len(can_res), 15))
        load_res.update(load_ch.take_results((1 if load is None else 2) - len(load_res), 15))
        results = {"canary_sink": can_res.get("canary_sink"), "account_sink": load_res.get("account_sink")}
        results.update(canary_load=can_res.get("load"), load=load_res.get("load"))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        stack.stop()
    needed = ("account_sink", "canary_sink", "canary_load") + (("load",) if load is not None else ())
    done: dict[str, dict[str, Any]] = {}
    for role in needed:
        r = results.get(role)
        if r is None:
            raise BenchError(f"phase {name}: the {role} process did not report")
        if "error" in r:
            raise BenchError(f"phase {name}: the {role} process failed:\n{r['error']}")
        done[role] = r
    return _figures(name, o, done, canary_sent, load_sent, drained, peaks, final, cpu_between(a, b))


def _figures(
    name: str,
    o: OverloadOptions,
    results: dict[str, dict[str, Any]],
    canary_sent: int,
    load_sent: int,
    drained: dict[str, Any],
    peaks: _Peaks,
    final: list[dict[str, object]],
    cpu: dict[str, float],
) -> dict[str, Any]:
    acc, cs = results["account_sink"], results["canary_sink"]
    ingest = acc["metrics"].get("ingest", {})
    shed_n, shed = shed_counted(ingest)
    out: dict[str, Any] = {
        "name": name,
        "canary": {
            "devices": o.canaries,
            "sent": canary_sent,
            "delivered": cs["delivered"],
            "missing": max(0, canary_sent - cs["delivered"]),
            "duplicates": cs["duplicates"],
            "dead_lettered": acc["canary"]["dead_lettered"],
            "latency": cs["latency"],
        },
        "drain": drained,
        "peak_rss_mb": dict(sorted(peaks.mb.items())),
        "processes": {k: len(v) for k, v in peaks.pids.items()},
        "services": {
            str(r["service"]): {
                "restarts": r["restarts"],
                "last_exit": r["last_exit"],
                "offline_statuses": acc["status"].get(str(r["service"]), {}).get("offline", 0),
                "last_status": acc["last_status"].get(str(r["service"])),
            }
            for r in final
        },
        "ingest_counters": ingest,
        "ingest_dlq_agreement": {
            # as of ingest's last metrics batch: its final one only when it stopped cleanly
            "counters_final": (acc["last_status"].get("ingest") or {}).get("state") == "stopped",
            "rejected_counter": ingest.get("rejected", 0) if ingest else None,
            "dead_letters_received": acc["dead_letters_by_stage"].get("ingest", 0),
            "dead_lettered_counted": acc["dead_lettered_by_stage"].get("ingest", 0),
            "handler_errors": ingest.get("bus_handler_errors"),  # a rejection counted, its publish failed?
            "dead_letter_duplicates": sum(
                acc[c]["dead_letter_duplicates"] for c in ("canary", "load", "other")
            ),
        },
        "dead_letter_fields_new": acc["dead_letter_fields_new"],
        "broker_dropped": acc["broker_dropped"],
        "cpu_pct": cpu,
    }
    cl = results["canary_load"]
    out["canary"].update(acked=cl.get("acked"), publish_errors=cl.get("errors"))
    ld = results.get("load")
    if ld is not None:
        lacc = acc["load"]
        accounted = lacc["events"] + lacc["dead_lettered"]
        out["load"] = {
            "device": LOAD_DEVICE[name],
            "qos": ld["spec"]["qos"],
            "messages": ld["msgs"],
            "sent": load_sent,
            "per_message": ld["spec"]["batch"],
            "message_bytes": round(float(ld.get("payload_bytes_mean", 0.0))),
            "publish_s": round(float(ld["elapsed_s"]), 3),
            "publish_error": ld.get("send_error"),
            "offered_msgs_per_s": round(ld["msgs"] / ld["elapsed_s"], 1) if ld["elapsed_s"] else 0.0,
            "events": lacc["events"],
            "event_duplicates": lacc["event_duplicates"],
            "dead_letters": lacc["dead_letters"],
            "dead_lettered": lacc["dead_lettered"],
            "dead_lettered_by_reason": lacc["dead_lettered_by_reason"],
            "dead_letter_duplicates": lacc["dead_letter_duplicates"],
            "shed_counted": shed_n,  # shown, not added: in the aggregate dead letters' counts
            "shed_counters": shed,
            "accounted": accounted,
            "difference": load_sent - accounted,  # > 0: readings nowhere to be found; < 0: counted twice
        }
    out["targets"] = _targets(out)
    return out


def _targets(p: dict[str, Any]) -> dict[str, Any]:
    t: dict[str, Any] = {
        "canaries_all_delivered": p["canary"]["missing"] == 0,
        "ingest_rss_mb_max": TARGET_INGEST_RSS_MB,
        "ingest_rss_met": p["peak_rss_mb"].get("ingest", 0.0) < TARGET_INGEST_RSS_MB,
    }
    if "load" in p:
        t["canary_p99_ms_max"] = TARGET_P99_MS
        lat = p["canary"]["latency"]
        t["canary_p99_met"] = bool(lat.get("count")) and lat.get("p99_ms", 0.0) < TARGET_P99_MS
        t["load_accounted"] = p["load"]["difference"] == 0
    t["met"] = all(v for k, v in t.items() if k.endswith(("_met", "_delivered", "_accounted")))
    return t


def summarize(phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline figures, flat, for the table, the docs and scripts."""
    s: dict[str, Any] = {}
    for name, p in phases.items():
        lat = p["canary"]["latency"]
        s[f"{name}_canary_p50_ms"] = lat.get("p50_ms")
        s[f"{name}_canary_p99_ms"] = lat.get("p99_ms")
        s[f"{name}_canaries_delivered"] = f"{p['canary']['delivered']}/{p['canary']['sent']}"
        s[f"{name}_ingest_peak_rss_mb"] = p["peak_rss_mb"].get("ingest")
        if "load" in p:
            s[f"{name}_load_sent"] = p["load"]["sent"]
            s[f"{name}_load_difference"] = p["load"]["difference"]
    if "flood" in phases and "load" in phases["flood"]:
        s["flood_offered_msgs_per_s"] = phases["flood"]["load"]["offered_msgs_per_s"]
    targets = {name: p["targets"]["met"] for name, p in phases.items()}
    s["targets_met"] = targets
    s["all_targets_met"] = bool(targets) and all(targets.values())
    return s


def _sleep_sampling(seconds: float, stack: Stack, peaks: _Peaks) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        peaks.sample(stack_pids(stack))
        time.sleep(min(0.25, left))


def _join_sampling(p: BaseProcess, timeout_s: float, stack: Stack, peaks: _Peaks) -> None:
    end = time.monotonic() + timeout_s
    while p.is_alive() and time.monotonic() < end:
        peaks.sample(stack_pids(stack))
        p.join(0.25)


def _drain(
    o: OverloadOptions,
    can_ch: Channels,
    canary_sent: int,
    load_ch: Channels,
    load_sent: int,
    stack: Stack,
    peaks: _Peaks,
) -> dict[str, Any]:
    """Wait until every canary reading arrived and the load device's readings are all accounted for,
    or ``drain_s`` passed, or nothing arrived for ``stall_s``: a slow site is waited for, a site that
    lost readings or stopped is not waited for forever."""
    return drain_until(
        lambda: (can_ch.received.value, load_ch.received.value),
        lambda got: got[0] >= canary_sent and got[1] >= load_sent,
        o.drain_s,
        o.stall_s,
        tick_s=0.1,
        on_tick=lambda: peaks.sample(stack_pids(stack)),
    )


def _brief(p: dict[str, Any]) -> str:
    lat = p["canary"]["latency"]
    text = (
        f"canaries {p['canary']['delivered']}/{p['canary']['sent']}, p50 {lat.get('p50_ms')} ms, "
        f"p99 {lat.get('p99_ms')} ms; peak RSS "
        + ", ".join(f"{k} {v:.0f} MB" for k, v in p["peak_rss_mb"].items())
    )
    if "load" in p:
        ld = p["load"]
        text += (
            f"; load: {ld['sent']:,} sent at {ld['offered_msgs_per_s']:,.0f} msgs/s, "
            f"{ld['events']:,} events + {ld['dead_lettered']:,} dead-lettered "
            f"(of which {ld['shed_counted']:,} shed), "
            f"difference {ld['difference']:,}"
        )
    return text + f"; drain {p['drain']['s']} s ({p['drain']['ended']})"
