"""``outpost secrets``: the connector gateway's credentials, encrypted at rest
(``{data_dir}/sites/{site}/connectors/secrets.json``, key ``secrets.key`` beside it, mode 0600).

A value is read from standard input (or typed at a hidden prompt), never from the command line,
where it would stay in the shell's history and show in ``ps``. ``list`` shows names and times, never
a value. ``rotate`` encrypts every value again under a new key."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from outpost.cli.output import JsonOpt, print_json, stdout_console
from outpost.cli.site import DataDirOpt, SiteOpt, find_site, group_options
from outpost.errors import ConfigError

if TYPE_CHECKING:
    from outpost.services.connectors.secrets import SecretStore

secrets_app = typer.Typer(help="Credentials for connectors: set, list, rotate.", no_args_is_help=True)
secrets_app.callback()(group_options)


def _store(data_dir: Path | None, site: str | None) -> SecretStore:
    from outpost.services.connectors.secrets import SecretStore

    return SecretStore(find_site(data_dir, site).site_path("connectors"))


@secrets_app.command("set")
def set_(
    name: Annotated[str, typer.Argument(help="The secret's name, as connectors name it ({secret: NAME}).")],
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """Store a secret: its value from standard input (one line), or typed at a hidden prompt."""
    from outpost.services.connectors.secrets import check_name

    check_name(name)
    if sys.stdin.isatty():
        value = typer.prompt(f"value of {name}", hide_input=True, confirmation_prompt=True)
    else:
        value = sys.stdin.readline().rstrip("\r\n")
    if not value:
        raise ConfigError("no value on standard input (pipe it in, or run in a terminal to be asked)")
    store = _store(data_dir, site)
    store.set(name, value)
    typer.echo(f"secret {name} stored in {store.path} (the running gateway reads it on its next call)")


@secrets_app.command("list")
def list_(
    json_out: JsonOpt = False,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """The secrets' names and when each was set: never a value."""
    store = _store(data_dir, site)
    names = store.names()
    if json_out:
        print_json({"secrets": names, "path": str(store.path)})
        return
    t = Table(title=f"secrets ({len(names)}) in {store.path}")
    t.add_column("name", no_wrap=True)
    t.add_column("created (UTC)", no_wrap=True)
    t.add_column("updated (UTC)", no_wrap=True)
    for name, times in names.items():
        t.add_row(name, _when(times.get("created_ns")), _when(times.get("updated_ns")))
    stdout_console().print(t)


@secrets_app.command("rotate")
def rotate(data_dir: DataDirOpt = None, site: SiteOpt = None) -> None:
    """A new key; every secret encrypted again with it (the old key opens nothing written from now)."""
    store = _store(data_dir, site)
    n = store.rotate()
    typer.echo(f"key rotated: {n} secrets encrypted again with the new key in {store.key_path}")


def _when(ns: int | None) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S") if ns else "-"


def register(app: typer.Typer) -> None:
    app.add_typer(secrets_app, name="secrets")
