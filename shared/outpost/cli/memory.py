"""``outpost memory``: what the cloud holds of memory sync.

Memory sync needs nothing started of its own: the site's memory service hands its streams to the
uplink service, and the cloud side (``outpost cloud run --db URL``) keeps the replica of every
site's long-term memory and log summaries (:mod:`outpost.services.memory.replica`) in its
database. ``outpost memory cloud --db URL`` shows what that replica holds per site.
"""

from __future__ import annotations

import typer
from rich.table import Table

from outpost.cli.cloud import DbOpt
from outpost.cli.output import JsonOpt, print_json, stdout_console
from outpost.cli.site import group_options
from outpost.clouddb import WrongDatabaseError, shown
from outpost.errors import ConfigError

memory_app = typer.Typer(help="Memory sync: what the cloud's replica holds.", no_args_is_help=True)
memory_app.callback()(group_options)


@memory_app.command("cloud")
def cloud(db: DbOpt, json_out: JsonOpt = False) -> None:
    """What the replica holds per site: items, log summaries, entries summarised, last offsets."""
    from outpost.services.memory.replica import ReplicaStore

    try:
        store = ReplicaStore(db, readonly=True)
    except WrongDatabaseError:
        raise ConfigError(
            f"no memory replica in {shown(db)} (the database `outpost cloud run --db` writes)"
        ) from None
    try:
        sites = store.overview()
    finally:
        store.close()
    if json_out:
        print_json({"sites": sites})
        return
    t = Table(title=f"cloud replica in {store.url_kind}")
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
