"""``outpost cloud``: the cloud side of a fleet of sites.

The receiving end of every site's uplink (``outpost cloud run``, ``outpost cloud status``) and the
cloud broker's configuration for a fleet (``outpost cloud broker-config``). docs/uplink.md says how
to run it for many sites.
"""

from __future__ import annotations

import threading
from typing import Annotated, Any

import typer
from rich.table import Table

from outpost.cli import cloud_broker
from outpost.cli.output import JsonOpt, print_json, stdout_console
from outpost.cli.site import CloudBrokerOpt, find_site, group_options
from outpost.clouddb import WrongDatabaseError

cloud_app = typer.Typer(
    help="The cloud side of a fleet: receive every site's uplink, show where each stands, configure the "
    "cloud broker.",
    no_args_is_help=True,
)
cloud_app.callback()(group_options)

# --- the uplink's receiving end (run, status) -----------------------------------------------------
CLOUD_SITE = "cloud"
"""The site name the cloud side runs under (its client ids, status and metrics on the cloud broker)."""
DbOpt = Annotated[
    str,
    typer.Option(
        "--db", help="Where the records go: postgresql://USER@HOST:PORT/DB (many sites) or sqlite:///PATH."
    ),
]


@cloud_app.command("run")
def run(db: DbOpt, broker: CloudBrokerOpt = None) -> None:
    """Receive every site's uplink (memory sync included) until Ctrl-C or SIGTERM: store each
    record once (PostgreSQL or SQLite) and acknowledge to the site only what is committed."""
    from outpost.service import install_stop_signals, run_until
    from outpost.services.memory.replica import ReplicaStore
    from outpost.services.uplink.cloud import CloudUplink
    from outpost.services.uplink.store import CloudStore

    # its durable sessions on the cloud broker are named after the site of its settings: always
    # the same one, whatever the shell's OUTPOST_SITE, or a session left behind would queue every
    # site's traffic for nobody
    settings = find_site(None, CLOUD_SITE, broker).settings
    # memory sync's replica: its tables in the same database, written in the uplink's transactions
    up = CloudUplink(settings, CloudStore(db, relay=ReplicaStore.relay_into(db)))
    stop = threading.Event()
    install_stop_signals(stop)
    mqtt = settings.mqtt
    stdout_console().print(
        f"cloud side on {mqtt.host}:{mqtt.port}: uplink and memory sync of every site, in {up.store.url_kind}"
    )
    run_until(up, stop)
    c = up.metrics.counters
    applied = sum(n for k, n in c.items() if k.startswith("applied."))
    stdout_console().print(
        f"stopped: {c['messages']:,} messages, {applied:,} records stored, "
        f"{c['duplicates'] + c['duplicate_ids']:,} duplicates, {c['rejected']:,} refused"
    )


@cloud_app.command("status")
def status(db: DbOpt, json_out: JsonOpt = False) -> None:
    """Per site and stream (the uplink's, and memory sync's as memory/ltm and memory/log): the
    acknowledged offset, records held, the lag (records the site held past its last message, as it
    said), when the last arrived. The uplink's ``memory`` stream carries memory sync: its records
    are the replica's (``-`` here)."""
    from outpost.services.memory.replica import ReplicaStore
    from outpost.services.uplink.store import CloudStore

    store = CloudStore(db, readonly=True)
    try:
        sites: dict[str, Any] = store.overview()
    finally:
        store.close()
    try:
        rs = ReplicaStore(db, readonly=True)
    except WrongDatabaseError:  # no memory sync was ever received there
        rs = None
    if rs is not None:
        try:
            for site, d in rs.overview().items():
                streams = sites.setdefault(site, {"streams": {}})["streams"]
                streams["memory/ltm"] = {"acked": d["ltm_offset"], "records": d["items"]}
                streams["memory/log"] = {"acked": d["log_offset"], "records": d["summaries"]}
        finally:
            rs.close()
    if json_out:
        print_json({"sites": sites})
        return
    if not sites:
        stdout_console().print("the cloud side holds nothing yet: no site has sent anything to this database")
        return
    t = Table(title="the cloud side")
    for col in ("site", "stream", "acked", "records", "behind", "last (s ago)"):
        t.add_column(col, justify="left" if col in ("site", "stream") else "right")
    for site, d in sorted(sites.items()):
        for stream, s in sorted(d["streams"].items()):
            since, behind = s.get("since_s"), s.get("behind")
            t.add_row(
                site,
                stream,
                str(s["acked"]),
                "-" if s["records"] is None else f"{s['records']:,}",
                "-" if behind is None else f"{behind:,}",
                "-" if since is None else f"{since:,.1f}",
            )
    stdout_console().print(t)


# --- the cloud broker's configuration (broker-config) ---------------------------------------------
cloud_app.command("broker-config")(cloud_broker.broker_config)


def register(app: typer.Typer) -> None:
    app.add_typer(cloud_app, name="cloud")
