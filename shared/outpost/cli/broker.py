"""``outpost broker``: the site broker's users (docs/security.md).

``enroll DEVICE`` adds a device to the site's table and prints its user name and password for
provisioning (the password is derived from the site key, so asking again prints the same one); a
running broker rereads its files at once. ``users`` lists the principals and what each may do, never
a password.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from outpost.access import SiteAccess
from outpost.cli.output import JsonOpt, print_json, stdout_console
from outpost.cli.site import DataDirOpt, SiteOpt, Where, find_site, group_options
from outpost.errors import ConfigError, TopicError
from outpost.services.registry import OutpostSettings

broker_app = typer.Typer(
    help="The site broker's users: enroll devices, list principals.", no_args_is_help=True
)
broker_app.callback()(group_options)


def _access(where: Where) -> SiteAccess:
    return SiteAccess.of(where.site_path(), where.settings.topics)


@broker_app.command("enroll")
def enroll(
    device: Annotated[str, typer.Argument(help="The device id ([A-Za-z0-9_-], at most 64).")],
    json_out: JsonOpt = False,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """Enroll DEVICE on the site's broker and print its user name and password for provisioning.
    The device may then publish only its own telemetry and status and read only its own commands."""
    where = find_site(data_dir, site)
    access = _access(where)
    try:
        folder, watched = where.broker_files()
        access.enroll_and_reload(folder, [device], watched=watched)
        password = access.device_password(device)
    except TopicError as exc:
        raise ConfigError(f"cannot enroll {device[:64]!r}: {exc}") from None
    doc = {"site": where.site, "broker": where.broker, "username": device, "password": password}
    if json_out:
        print_json(doc)
        return
    out = stdout_console()
    out.print(f"device {device!r} enrolled on site {where.site!r} (broker {where.broker})")
    out.print(f"username: {device}")
    out.print(f"password: {password}")


@broker_app.command("users")
def users(json_out: JsonOpt = False, data_dir: DataDirOpt = None, site: SiteOpt = None) -> None:
    """The principals of the site's broker and what each may read and write (never a password)."""
    where = find_site(data_dir, site)
    access = _access(where)
    principals = access.principals(access.services() or list(OutpostSettings.SERVICES))
    rows = [
        {
            "user": p.user,
            "kind": p.kind,
            "read": [r.topic for r in p.rules if r.access in ("read", "readwrite")],
            "write": [r.topic for r in p.rules if r.access in ("write", "readwrite")],
        }
        for p in principals
    ]
    if json_out:
        print_json({"site": where.site, "auth": where.settings.broker.auth, "users": rows})
        return
    root = where.settings.topics.root + "/"
    table = Table(title=f"broker users of site {where.site!r} (topics under {root})")
    for col in ("user", "kind", "reads", "writes"):
        table.add_column(col)
    for r in rows:
        short = [[t.removeprefix(root) for t in r[k]] for k in ("read", "write")]
        table.add_row(str(r["user"]), str(r["kind"]), "\n".join(short[0]), "\n".join(short[1]))
    stdout_console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(broker_app, name="broker")
