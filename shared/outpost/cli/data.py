"""``outpost data``: the data folder: where the commands look, which sites it holds, and the
migration of a folder written before state was kept per site (docs/operations.md)."""

from __future__ import annotations

from typing import Annotated

import typer

from outpost.cli.output import JsonOpt, print_json, stdout_console
from outpost.cli.site import DataDirOpt, SiteOpt, find_site, group_options
from outpost.datadir import legacy_state, migrate, sites

data_app = typer.Typer(
    help="The data folder: where commands look, its sites, migrating an older one.", no_args_is_help=True
)
data_app.callback()(group_options)


@data_app.command("where")
def where(
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Where the commands look (data folder, site, broker, and what gave each), the sites the
    folder holds, and whether an outpost up runs there."""
    w = find_site(data_dir, site)
    doc = {
        **w.describe(),
        "sites": sites(w.data_dir),
        "legacy_state": [str(p) for p in legacy_state(w.data_dir)],
    }
    if json_out:
        print_json(doc)
        return
    out = stdout_console()
    out.print(f"data folder  {w.data_dir}  (from {w.data_dir_from})")
    out.print(f"site         {w.site}  (from {w.site_from}); its state: {w.site_path()}")
    out.print(f"broker       {w.broker}  (from {w.broker_from})")
    out.print(f"running      {w.running()}")
    out.print(f"sites here   {', '.join(doc['sites']) or 'none yet'}")
    if doc["legacy_state"]:
        out.print(
            f"[yellow]older layout[/]: {', '.join(doc['legacy_state'])} (outpost data migrate --site NAME)"
        )


@data_app.command("migrate")
def migrate_cmd(
    site: Annotated[str, typer.Option("--site", help="The site the older folder's state belongs to.")],
    data_dir: DataDirOpt = None,
) -> None:
    """Move the state of a data folder written before state was kept per site (ingest.db, memory/,
    inference/, mosquitto/, logs/ directly in it) under sites/SITE/. Refused while an outpost up
    owns the folder, or when SITE already has state there."""
    w = find_site(data_dir, site)
    moved = migrate(w.data_dir, w.site)
    for src, dst in moved:
        typer.echo(f"moved {src} -> {dst}")
    typer.echo(
        f"{len(moved)} paths moved: {w.data_dir} now holds site {w.site!r}; "
        f"`outpost up --site {w.site}` runs it"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
