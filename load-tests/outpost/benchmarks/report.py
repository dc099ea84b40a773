"""Rich tables for the benchmarks' results (the JSON form is the result dict itself)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table


def _n(x: Any, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{float(x):,.{digits}f}"


def _ms(lat: dict[str, Any], key: str) -> str:
    v = lat.get(key)
    return "-" if v is None else f"{float(v):.2f}"


def _target(sc: dict[str, Any]) -> str:
    t = sc.get("target")
    if not isinstance(t, dict):
        return ""
    goal = f">= {t['ratio']:.0%} of raw" if "ratio" in t else f">= {t['readings_per_s']:,.0f}/s"
    return f"{goal}: " + ("[green]met[/]" if t["met"] else "[red]missed[/]")


def ingest_tables(result: dict[str, Any]) -> list[Table]:
    """Throughput (raw vs ingest per scenario) and latency tables."""
    thr = Table(title="ingest throughput (readings/s; CPU in % of one core, during the window)")
    for col in ("scenario", "QoS", "per msg", "raw", "ingest", "ratio", "ingest CPU", "other CPU", "target"):
        thr.add_column(col, justify="right" if col not in ("scenario", "target") else "left")
    lat = Table(title="latency: reading ts at publish -> received by a subscriber (ms)")
    for col in (
        "phase",
        "QoS",
        "per msg",
        "offered/s",
        "received/s",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "n",
    ):
        lat.add_column(col, justify="left" if col == "phase" else "right")
    for name, sc in result.get("scenarios", {}).items():
        phases: dict[str, dict[str, Any]] = sc.get("phases", {})
        if name == "latency":
            for pname, p in phases.items():
                la = p.get("latency", {})
                lat.add_row(
                    pname + (" [red](saturated)[/]" if p.get("saturated") else ""),
                    str(p["qos"]),
                    str(p["batch"]),
                    _n(p["offered_per_s"]),
                    _n(p["readings_per_s"]),
                    *(_ms(la, k) for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")),
                    _n(la.get("count")),
                )
            continue
        raws = [p for k, p in phases.items() if k.endswith("_raw")]
        ing = next((p for k, p in phases.items() if k.endswith("_ingest")), None)
        raw = raws[0] if raws else None
        any_p = ing or raw
        if any_p is None:
            continue
        thr.add_row(
            name,
            str(any_p["qos"]),
            str(any_p["batch"]),
            _n(raw["readings_per_s"]) if raw else "-",
            _n(ing["readings_per_s"]) if ing else "-",
            f"{sc['ratio']:.0%}" if "ratio" in sc else "-",
            _n(ing["cpu_pct"].get("ingest"), 0) if ing else "-",
            _n(ing["cpu_pct"].get("other"), 0) if ing else "-",
            _target(sc),
        )
        for extra in raws[1:]:
            thr.add_row(
                f"  {extra['name']}", str(extra["qos"]), str(extra["batch"]), _n(extra["readings_per_s"])
            )
    return [thr, lat]


def machine_line(result: dict[str, Any]) -> str:
    m = result.get("machine", {})
    return (
        f"{m.get('cpus')} CPUs ({m.get('cpu_model')}), Python {m.get('python')}, "
        f"Mosquitto {m.get('mosquitto')}, paho-mqtt {m.get('paho_mqtt')}; "
        f"load average {m.get('load_avg_1m_before')} before, "
        f"{m.get('load_avg_1m_after')} after; {result.get('elapsed_s')} s"
    )


def print_ingest(result: dict[str, Any], console: Console) -> None:
    for table in ingest_tables(result):
        console.print(table)
    console.print(machine_line(result))


def clients_table(result: dict[str, Any]) -> Table:
    t = Table(title="MQTT clients: one publisher process -> one subscriber process (msgs/s received)")
    for col in (
        "client",
        "MQTT",
        "QoS",
        "msgs/s",
        "undelivered",
        "sub CPU",
        "pub CPU",
        "broker CPU",
        "other CPU",
        "note",
    ):
        t.add_column(col, justify="left" if col in ("client", "note") else "right")
    for row in result.get("runs", []):
        cpu = row.get("cpu_pct", {})
        t.add_row(
            row["client"],
            row.get("protocol", ""),
            str(row["qos"]),
            _n(row.get("msgs_per_s")),
            _n(row.get("undelivered")),
            _n(cpu.get("sub")),
            _n(cpu.get("pub")),
            _n(cpu.get("mosquitto")),
            _n(cpu.get("other")),
            str(row.get("error") or row.get("note") or "")[:80],
        )
    return t


def _met(ok: bool) -> str:
    return "[green]met[/]" if ok else "[red]MISSED[/]"


def overload_table(result: dict[str, Any]) -> Table:
    """A column per phase: the canaries next to the baseline, the load device's accounting, peak RSS."""
    phases: dict[str, dict[str, Any]] = result.get("phases", {})
    t = Table(title="overload: canary devices (QoS 1) while one device floods or sends bad batches")
    t.add_column("figure")
    for name in phases:
        t.add_column(name, justify="right")
    t.add_column("target")
    base = phases.get("baseline", {}).get("canary", {}).get("latency", {}).get("p99_ms")

    def row(label: str, cell: Any, target: str = "") -> None:
        t.add_row(label, *(cell(p) for p in phases.values()), target)

    def load(key: str, digits: int = 0) -> Any:
        return lambda p: _n(p["load"][key], digits) if "load" in p else "-"

    def rss(key: str) -> Any:
        return lambda p: _n(p["peak_rss_mb"].get(key))

    def vs_base(p: dict[str, Any]) -> str:
        p99 = p["canary"]["latency"].get("p99_ms")
        return f"{p99 / base:,.1f}x" if base and p99 else "-"

    def agree(p: dict[str, Any]) -> str:
        a = p["ingest_dlq_agreement"]
        final = "" if a.get("counters_final") else " (not final)"
        errors = f" ({_n(a.get('handler_errors'))})"
        return f"{_n(a['rejected_counter'])} / {a['dead_lettered_counted']:,}{errors}{final}"

    def svc(p: dict[str, Any]) -> str:
        s = p["services"].values()
        return f"{sum(int(x['offline_statuses']) for x in s)} / {sum(int(x['restarts']) for x in s)}"

    row(
        "load: offered msgs/s (bytes each)",
        lambda p: (
            f"{_n(p['load']['offered_msgs_per_s'])} ({_n(p['load']['message_bytes'])})"
            if "load" in p
            else "-"
        ),
    )
    row("canary p50 ms", lambda p: _ms(p["canary"]["latency"], "p50_ms"))
    row(
        "canary p99 ms",
        lambda p: _ms(p["canary"]["latency"], "p99_ms"),
        f"< {_n(_target_p99(phases))} ms under load",
    )
    row("canary p99 vs baseline", vs_base)
    row(
        "canaries delivered / sent",
        lambda p: f"{p['canary']['delivered']:,} / {p['canary']['sent']:,}",
        "all",
    )
    row("load: readings sent", load("sent"))
    row("  validated events", load("events"))
    row("  dead-lettered (items)", load("dead_lettered"))
    row("  of which shed unread (ingest's counter)", load("shed_counted"))
    row("  difference (sent - accounted)", load("difference"), "0")
    row("ingest rejected counter / dead letters' count (handler errors)", agree, "equal (0)")
    row("peak RSS MB: ingest", rss("ingest"), "< 150")
    row("peak RSS MB: inference", rss("inference"))
    row("peak RSS MB: memory", rss("memory"))
    row("peak RSS MB: broker", rss("mosquitto"))
    row("service offline statuses / restarts", svc, "0 / 0")
    row("drain after the window, s", lambda p: f"{p['drain']['s']} ({p['drain']['ended']})")
    row(
        "CPU %: ingest / other processes",
        lambda p: f"{_n(p['cpu_pct'].get('ingest'))} / {_n(p['cpu_pct'].get('other'))}",
    )
    return t


def _target_p99(phases: dict[str, dict[str, Any]]) -> float | None:
    return next(
        (p["targets"]["canary_p99_ms_max"] for p in phases.values() if "canary_p99_ms_max" in p["targets"]),
        None,
    )


def print_overload(result: dict[str, Any], console: Console) -> None:
    console.print(overload_table(result))
    for name, p in result.get("phases", {}).items():
        tg, ld = p["targets"], p.get("load")
        parts = [f"all canary readings delivered: {_met(tg['canaries_all_delivered'])}"]
        if "canary_p99_met" in tg:
            parts.insert(0, f"canary p99 < {tg['canary_p99_ms_max']:.0f} ms: {_met(tg['canary_p99_met'])}")
            parts.append(f"every reading accounted for: {_met(tg['load_accounted'])}")
        parts.append(f"ingest < {tg['ingest_rss_mb_max']:.0f} MB: {_met(tg['ingest_rss_met'])}")
        console.print(f"{name}: " + "; ".join(parts))
        if ld:
            reasons = ", ".join(f"{k} {v:,}" for k, v in ld["dead_lettered_by_reason"].items()) or "none"
            agree = p["ingest_dlq_agreement"]
            console.print(
                f"  dead-lettered by reason: {reasons}; ingest's rejected counter "
                f"{_n(agree['rejected_counter'])} vs {agree['dead_letters_received']:,} dead letters "
                f"({agree['dead_letter_duplicates']:,} duplicates)"
                + (
                    ""
                    if agree.get("counters_final")
                    else " [red](ingest's last counters: it did not stop cleanly)[/]"
                )
                + "; "
                f"drain {p['drain']['s']} s ({p['drain']['ended']})"
            )
    console.print(machine_line(result))


def agent_table(result: dict[str, Any]) -> Table:
    """The pipeline next to the broker hops alone: rates, latency, counts, CPU of every process."""
    h, p = result["phases"]["hops"], result["phases"]["pipeline"]
    t = Table(title="agents: reading sent -> decision at a subscriber, next to one broker hop (QoS 1)")
    for col in ("", "broker hops alone", "pipeline (ingest, inference, agent)"):
        t.add_column(col, justify="left" if not col else "right")
    hl, pl = h["latency"], p["latency"]
    t.add_row("offered readings/s", _n(h["offered_per_s"]), _n(p["offered_per_s"]))
    t.add_row("out/s (readings; decisions)", _n(h["received_per_s"]), _n(p["decisions_per_s"]))
    for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
        t.add_row(key.replace("_ms", " ms"), _ms(hl, key), _ms(pl, key))
    t.add_row("measured (in the window)", _n(hl.get("count")), _n(pl.get("count")))
    t.add_row(
        "sent / out (whole run)", f"{h['sent']:,} / {h['received']:,}", f"{p['sent']:,} / {p['decided']:,}"
    )
    t.add_row(
        "decided / sent in the window",
        "",
        f"{p['decided_in_window']:,} / {p['sent_in_window']:,} (missing {p['missing_in_window']:,})",
    )
    t.add_row(
        "not decided (whole run) / unscored",
        "",
        f"{p['not_decided']:,} / {p['unscored_expected']:,} (first readings of each device)",
    )
    t.add_row("duplicates / unknown", "", f"{p['duplicates']:,} / {p['unknown']:,}")
    roles = [r for r in p["cpu_pct"] if r not in ("other", "steal")] + ["other", "steal"]
    for role in roles:
        t.add_row(f"CPU % {role}", _n(h["cpu_pct"].get(role), 1), _n(p["cpu_pct"].get(role), 1))
    return t


def print_agent(result: dict[str, Any], console: Console) -> None:
    console.print(agent_table(result))
    s, p = result["summary"], result["phases"]["pipeline"]
    console.print(
        f"pipeline p99 < {s['target_p99_ms_max']:.0f} ms: {_met(s['all_targets_met'])} "
        f"({_n(s['pipeline_p99_ms'], 1)} ms; one hop alone {_n(s['hops_p99_ms'], 1)} ms)"
    )
    c = p["service_counters"]
    console.print(
        "the services' counters: "
        + "; ".join(
            f"{svc} " + ", ".join(f"{k} {v:,}" for k, v in sorted(cs.items())) for svc, cs in c.items()
        )
    )
    for svc, prof in p.get("profile", {}).items():
        top = ", ".join(f"{f} {v}%" for f, v in prof["self_pct"][:5])
        console.print(f"profile {svc} ({prof['samples']:,} samples), most self time: {top}")
    console.print(machine_line(result))


CONNECTOR_PHASES = (
    ("direct", "direct, paced (in turns)"),
    ("gateway", "gateway, paced (in turns)"),
    ("hops", "broker hop alone"),
    ("direct_max", "direct, flat out"),
    ("gateway_max", "gateway, flat out"),
)


def connectors_table(result: dict[str, Any]) -> Table:
    """Every phase side by side: rates, latency, what was accounted for, CPU of every process."""
    ph = result["phases"]
    t = Table(title="connectors: direct httpx calls vs the gateway (QoS 1, durable outbox), same run")
    t.add_column("")
    for _, label in CONNECTOR_PHASES:
        t.add_column(label, justify="right")

    def row(label: str, f: Callable[[dict[str, Any]], str], only: tuple[str, ...] = ()) -> None:
        t.add_row(label, *(f(ph[n]) if not only or n in only else "" for n, _ in CONNECTOR_PHASES))

    row("offered/s", lambda p: _n(p["offered_per_s"]) if p["offered_per_s"] else "flat out")
    row("answered/s (calls; messages; results)", lambda p: _n(p["out_per_s"]))

    def lat(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda p: _ms(p["latency"], key)

    def cpu(role: str) -> Callable[[dict[str, Any]], str]:
        return lambda p: _n(p["cpu_pct"].get(role), 1)

    for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
        row(key.replace("_ms", " ms"), lat(key))
    row("measured (in the window)", lambda p: _n(p["latency"].get("count")))
    row("sent", lambda p: _n(p["sent"]))
    gw = ("gateway", "gateway_max")
    row(
        "results done / other",
        lambda p: (
            f"{p['outcomes'].get('done', 0):,} / {sum(v for k, v in p['outcomes'].items() if k != 'done'):,}"
        ),
        gw,
    )
    row("missing / duplicates", lambda p: f"{p['missing']:,} / {p['duplicates']:,}", gw)
    row("peer: keys / effects not once", lambda p: f"{p['peer_keys']:,} / {p['peer_effects_not_once']:,}", gw)
    roles = [*sorted({r for p in ph.values() for r in p["cpu_pct"]} - {"other", "steal"}), "other", "steal"]
    for role in roles:
        row(f"CPU % {role}", cpu(role))
    return t


def print_connectors(result: dict[str, Any], console: Console) -> None:
    console.print(connectors_table(result))
    s = result["summary"]
    console.print(
        f"added by the gateway: p50 {_n(s['added_p50_ms'], 2)} ms, p99 {_n(s['added_p99_ms'], 2)} ms "
        f"(target <= {s['target_added_p99_ms_max']:g} ms: {_met(s['targets_met']['added_p99'])}); "
        f"one broker hop alone p50 {_n(s['hops_p50_ms'], 2)} ms, p99 {_n(s['hops_p99_ms'], 2)} ms"
    )
    console.print(
        f"actions/s flat out {_n(s['gateway_max_actions_per_s'])} "
        f"(target >= {s['target_actions_per_s_min']:,.0f}: {_met(s['targets_met']['actions_per_s'])}); "
        f"direct calls flat out {_n(s['direct_max_calls_per_s'])}/s; every request accounted for: "
        f"{_met(s['every_request_accounted'])}"
    )
    st = result["phases"]["gateway"].get("stages", {})
    if st.get("in_gateway", {}).get("count"):
        console.print(
            "the paced gateway's requests, stage by stage (p50 / p99 ms): "
            + "; ".join(
                f"{label} {_ms(st[k], 'p50_ms')} / {_ms(st[k], 'p99_ms')}"
                for k, label in (
                    ("to_gateway", "publish -> intake"),
                    ("in_gateway", "intake -> answer (outbox commit, queue, call)"),
                    ("result_out", "answer -> result at the subscriber (commit, publish)"),
                )
            )
        )
    prof = result["phases"]["gateway"].get("profile", {}).get("connectors")
    if prof:
        top = ", ".join(f"{f} {v}%" for f, v in prof["self_pct"][:6])
        console.print(f"profile connectors ({prof['samples']:,} samples), most self time: {top}")
    console.print(machine_line(result))
