"""``outpost memory``: the cloud side of memory sync.

``outpost memory replica`` runs beside the cloud broker and keeps a replica of every site's
long-term memory and log summaries (:mod:`outpost.services.memory.replica`); ``outpost memory cloud``
shows what it holds per site. The site side needs nothing started: its memory service syncs
through the uplink bridge that ``outpost up`` configures from ``uplink.cloud``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from outpost.cli.output import JsonOpt, print_json, stdout_console
from outpost.cli.site import CloudBrokerOpt, find_site, group_options
from outpost.clouddb import sqlite_url
from outpost.errors import ConfigError
from outpost.services.registry import OutpostSettings

memory_app = typer.Typer(
    help="Memory sync, the cloud side: run the replica, see what it holds.", no_args_is_help=True
)

DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where the replica keeps replica.db (default: the data folder).",
        show_default=False,
    ),
]
memory_app.callback()(group_options)


def _settings(broker: str | None, data_dir: Path | None) -> OutpostSettings:
    return find_site(data_dir, None, broker).settings


@memory_app.command("replica")
def replica(broker: CloudBrokerOpt = None, data_dir: DataOpt = None) -> None:
    """Run the cloud replica until Ctrl-C or SIGTERM: it applies every site's sync messages and
    acknowledges what it has stored."""
    from outpost.service import install_stop_signals, run_until
    from outpost.services.memory.replica import REPLICA_FILE, CloudReplica

    settings = _settings(broker, data_dir)
    stop = threading.Event()
    install_stop_signals(stop)
    rep = CloudReplica(settings)
    stdout_console().print(
        f"replica on {settings.mqtt.host}:{settings.mqtt.port}, "
        f"state in {Path(settings.data_dir) / REPLICA_FILE}"
    )
    run_until(rep, stop)
    c = rep.metrics.counters
    stdout_console().print(
        f"stopped: {c['messages']:,} messages, {c['applied.ltm']:,} memory changes and "
        f"{c['applied.log']:,} log summaries applied, {c['duplicates']:,} duplicates, "
        f"{c['rejected']:,} refused"
    )


@memory_app.command("cloud")
def cloud(
    data_dir: DataOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """What the replica holds per site: items, log summaries, entries summarised, last offsets."""
    from outpost.services.memory.replica import REPLICA_FILE, ReplicaStore

    path = Path(_settings(None, data_dir).data_dir) / REPLICA_FILE
    if not path.is_file():
        raise ConfigError(f"no replica at {path} (run `outpost memory replica` there first)")
    store = ReplicaStore(sqlite_url(path), readonly=True)
    try:
        sites = store.overview()
    finally:
        store.close()
    if json_out:
        print_json({"sites": sites})
        return
    t = Table(title=f"cloud replica {path}")
    for col in ("site", "items", "summaries", "log entries", "ltm offset", "log offset"):
        t.add_column(col, justify="right" if col != "site" else "left")
    for site, d in sites.items():
        t.add_row(
            site,
            f"{d['items']:,}",
            f"{d['summaries']:,}",
            f"{d['entries']:,}",
            str(d["ltm_offset"]),
            str(d["log_offset"]),
        )
    stdout_console().print(t)


def register(app: typer.Typer) -> None:
    app.add_typer(memory_app, name="memory")
