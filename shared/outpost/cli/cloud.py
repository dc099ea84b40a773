"""``outpost cloud``: the cloud side of a fleet of sites.

The receiving end of every site's uplink (``outpost cloud run``, ``outpost cloud status``) and the
cloud broker's configuration for a fleet (``outpost cloud broker-config``). docs/uplink.md says how
to run it for many sites.
"""

from __future__ import annotations

import typer

from outpost.cli import cloud_broker
from outpost.cli.site import group_options

cloud_app = typer.Typer(
    help="The cloud side of a fleet: receive every site's uplink, show where each stands, configure the "
    "cloud broker.",
    no_args_is_help=True,
)
cloud_app.callback()(group_options)

# --- the uplink's receiving end (run, status) -----------------------------------------------------

# --- the cloud broker's configuration (broker-config) ---------------------------------------------
cloud_app.command("broker-config")(cloud_broker.broker_config)


def register(app: typer.Typer) -> None:
    app.add_typer(cloud_app, name="cloud")
