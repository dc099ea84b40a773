"""``outpost cloud broker-config``: the cloud broker's config for a fleet of sites, generated
(:class:`outpost.access.CloudBroker`; docs/security.md#the-cloud-broker-of-a-fleet).

Each site's bridge user may write only ``{prefix}/v1/{site}/up/#`` and read only
``{prefix}/v1/{site}/down/#``; the cloud side's user (``outpost cloud run``) reads every site's
``up/#`` and writes ``down/#``. Passwords are stored 0600 in the folder, never printed: the command
says which file holds each and which settings a site gives its uplink.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from outpost.access import CLOUD_USER, CloudBroker, bridge_user
from outpost.cli.output import JsonOpt, print_json, stdout_console
from outpost.cli.site import find_site
from outpost.errors import ConfigError, TopicError


def broker_config(
    sites: Annotated[list[str], typer.Argument(help="The fleet's site ids.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder for mosquitto.conf, passwd, acl, credentials/.")],
    host: Annotated[str, typer.Option(help="Address the listener binds.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Listener port.")] = 1883,
    tls_ca: Annotated[
        Path | None, typer.Option(help="CA file (client certificates are checked against it).")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="The broker's certificate: TLS on.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The broker's private key.")] = None,
    require_certificate: Annotated[
        bool,
        typer.Option(
            "--require-certificate", help="Refuse a bridge without a certificate signed by --tls-ca."
        ),
    ] = False,
    run_as: Annotated[
        str | None, typer.Option(help="The user Mosquitto runs as when started as root (default: mosquitto).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write the cloud broker's config for a fleet of SITES: each site's bridge confined to its own
    up/ and down/, the cloud side's user reading every site's up/. Run it again to add a site:
    the passwords already made are kept."""
    settings = find_site().settings
    if require_certificate and tls_ca is None:
        raise ConfigError("--require-certificate needs --tls-ca")
    broker = CloudBroker(
        out.resolve(),
        settings.prefix,
        tuple(dict.fromkeys(sites)),
        host=host,
        port=port,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        require_certificate=require_certificate,
        run_as=run_as,
    )
    try:
        conf = broker.write()
    except TopicError as exc:
        raise ConfigError(f"broker-config: {exc}") from None
    users = {site: bridge_user(site) for site in broker.sites}
    doc = {
        "config": str(conf),
        "cloud_user": {"username": CLOUD_USER, "password_file": str(broker.credentials(CLOUD_USER))},
        "sites": {
            site: {"username": user, "password_file": str(broker.credentials(user))}
            for site, user in users.items()
        },
    }
    if json_out:
        print_json(doc)
        return
    say = stdout_console().print
    say(f"cloud broker config for {len(users)} site(s): mosquitto -c {conf}")
    cloud = broker.credentials(CLOUD_USER)
    say(
        f"the cloud side: OUTPOST_MQTT__USERNAME={CLOUD_USER} OUTPOST_MQTT__PASSWORD=$(cat {cloud}) "
        "outpost cloud run ..."
    )
    for site, user in users.items():
        secret = broker.credentials(user)
        say(
            f"site {site}: OUTPOST_UPLINK__USERNAME={user} OUTPOST_UPLINK__PASSWORD=$(cat {secret})"
            + (" OUTPOST_UPLINK__CA=<the CA file>" if tls_cert is not None else "")
        )
