"""How every ``outpost`` command finds the site it works on, the same way, in this one place.

``--data-dir`` and ``--site`` are accepted before the subcommand (``outpost --site shop12 log
tail``), after a group (``outpost log --data-dir D tail``) and after the subcommand; the one
nearest the command wins. Then, for what none of them gives:

1. the data folder: ``OUTPOST_DATA_DIR`` or the site file's ``data_dir``, else the default
   (``~/.local/share/outpost``: absolute, so the same from any folder);
2. the site: ``OUTPOST_SITE`` or the site file, else the site of the ``outpost up`` that owns the
   data folder (its run file, ``{data_dir}/run.json``), else the folder's only site, else ``site1``;
3. the broker: ``--broker``, else ``OUTPOST_MQTT__HOST``/``PORT`` or the site file, else the run
   file's broker when it runs that site, else 127.0.0.1:1883;
4. the broker credentials: ``OUTPOST_MQTT__USERNAME``/``PASSWORD`` or the site file, else, when the
   broker is the one the run file's ``outpost up`` started, the operator's user from the site's
   credentials folder (docs/security.md).

:class:`Where` says which of these gave each value, so a command that finds nothing can say where
it looked. Nothing here creates a file or a folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr

from outpost.access import OPERATOR, SiteAccess, asks_passwords
from outpost.datadir import RUN_FILE, RunInfo, check_folder, read_run, site_path, sites
from outpost.errors import ConfigError
from outpost.services.registry import OutpostSettings, load_settings

DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="The data folder (default: OUTPOST_DATA_DIR, the site file, then ~/.local/share/outpost).",
        show_default=False,
    ),
]
SiteOpt = Annotated[
    str | None,
    typer.Option(
        "--site",
        help="Site id (default: OUTPOST_SITE, the site file, then the site outpost up runs there).",
        show_default=False,
    ),
]

SiteBrokerOpt = Annotated[
    str | None,
    typer.Option(
        "--broker", help="The site's broker, HOST:PORT (default: the settings, then the running site's)."
    ),
]
CloudBrokerOpt = Annotated[
    str | None, typer.Option("--broker", help="HOST:PORT of the cloud broker (default: mqtt.host/port).")
]

_given: dict[str, Any] = {"data_dir": None, "site": None}
"""``--data-dir`` and ``--site`` given before the subcommand (set anew on every invocation)."""


def root_options(data_dir: DataDirOpt = None, site: SiteOpt = None) -> None:
    """The root app's callback: the options given before any subcommand."""
    _given["data_dir"], _given["site"] = data_dir, site


def group_options(data_dir: DataDirOpt = None, site: SiteOpt = None) -> None:
    """A group's callback (``outpost log``, ``outpost model``, ...): what it is given wins over the
    root's."""
    if data_dir is not None:
        _given["data_dir"] = data_dir
    if site is not None:
        _given["site"] = site


@dataclass
class Where:
    """Where a command works: the settings (data folder, site, broker resolved) and why."""

    settings: OutpostSettings
    run: RunInfo | None
    """The data folder's run file (``live`` False: left by a run that was killed); None: none."""
    data_dir_from: str
    site_from: str
    broker_from: str
    access: SiteAccess | None = None
    """The site's broker credentials when the command aims at the broker its ``outpost up`` started
    with auth on (its config listens at that address and checks passwords; docs/security.md); the
    settings' ``mqtt`` then holds the operator's user unless ``OUTPOST_MQTT__USERNAME`` names
    another. None for an external broker (``outpost up --broker``) or auth off, unless that broker
    reads the files outpost writes (``broker.files``, compose's)."""

    @property
    def data_dir(self) -> Path:
        return Path(self.settings.data_dir)

    @property
    def site(self) -> str:
        return self.settings.site

    @property
    def broker(self) -> str:
        return f"{self.settings.mqtt.host}:{self.settings.mqtt.port}"

    def site_path(self, *parts: str) -> Path:
        return site_path(self.data_dir, self.site, *parts)

    def broker_files(self) -> tuple[Path, bool]:
        """Where the site's broker reads its password file and ACL, and whether it watches them
        itself (``broker.files``, compose's broker) rather than being sent SIGHUP (``outpost up``'s)."""
        files, own = self.settings.broker.files, self.site_path("mosquitto")
        if files is None or asks_passwords(own, self.broker):  # outpost up's own broker runs there
            return own, False
        return Path(files), True

    def running(self) -> str:
        """One line on what runs in the data folder, for messages."""
        run_file = self.data_dir / RUN_FILE
        if self.run is None:
            return f"no outpost up runs on {self.data_dir} (no {run_file})"
        if not self.run.live:
            return (
                f"no outpost up runs on {self.data_dir} ({run_file} was left by PID {self.run.pid}, killed)"
            )
        r = self.run
        return f"outpost up PID {r.pid} runs site {r.site!r} on {self.data_dir}, broker {r.broker}"

    def missing(self, what: str, path: Path) -> ConfigError:
        """The error of a command that reads state the site does not have (it never creates it):
        where it looked, what runs there, and where the site and folder came from."""
        return ConfigError(
            f"no {what} for site {self.site!r}: looked for {path} ({self.running()}; site from "
            f"{self.site_from}, data folder from {self.data_dir_from}); give --data-dir and --site, "
            "or start the site once with `outpost up`"
        )

    def describe(self) -> dict[str, Any]:
        """Where it looked, for ``--json`` and for messages."""
        return {
            "data_dir": str(self.data_dir),
            "data_dir_from": self.data_dir_from,
            "site": self.site,
            "site_from": self.site_from,
            "broker": self.broker,
            "broker_from": self.broker_from,
            "running": self.running(),
        }


def find_site(data_dir: Path | None = None, site: str | None = None, broker: str | None = None) -> Where:
    """Resolve the data folder, the site and the broker as the module says (the arguments are the
    command's own ``--data-dir``, ``--site``, ``--broker``)."""
    from outpost.stack import parse_broker

    data_dir = data_dir if data_dir is not None else _given["data_dir"]
    site = site if site is not None else _given["site"]
    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if site is not None:
        overrides["site"] = site
    s = load_settings(**overrides)
    check_folder(s.data_dir)
    configured = s.model_fields_set
    data_dir_from = (
        "--data-dir"
        if data_dir is not None
        else "OUTPOST_DATA_DIR / site file"
        if "data_dir" in configured
        else "the default"
    )
    run = read_run(s.data_dir)
    live = run if run is not None and run.live else None
    if site is not None:
        site_from = "--site"
    elif "site" in configured:
        site_from = "OUTPOST_SITE / site file"
    elif live is not None:
        s.site, site_from = live.site, f"the run file of outpost up PID {live.pid}"
    elif len(present := sites(s.data_dir)) == 1:
        s.site, site_from = present[0], "the only site in the data folder"
    else:
        site_from = "the default"
    if broker:
        s.mqtt.host, s.mqtt.port = parse_broker(broker)
        broker_from = "--broker"
    elif "mqtt" in configured and {"host", "port"} & s.mqtt.model_fields_set:
        # (a user name alone, OUTPOST_MQTT__USERNAME, still aims at the running site's broker)
        broker_from = "OUTPOST_MQTT__HOST/PORT / site file"
    elif live is not None and live.site == s.site:
        s.mqtt.host, s.mqtt.port = parse_broker(live.broker)
        broker_from = f"the run file of outpost up PID {live.pid}"
    else:
        broker_from = "the default"
    access = None
    address = f"{s.mqtt.host}:{s.mqtt.port}"
    if (
        live is not None
        and live.site == s.site
        and live.broker == address
        and (
            asks_passwords(site_path(s.data_dir, s.site, "mosquitto"), address)
            or (s.broker.files is not None and s.broker.auth and (s.broker.files / "passwd").is_file())
        )
    ):
        found = SiteAccess.of(site_path(s.data_dir, s.site), s.topics)
        password = found.known_password(OPERATOR) if found.exists else None
        if password is not None:
            access = found
            if s.mqtt.username is None:  # OUTPOST_MQTT__USERNAME/PASSWORD win
                s.mqtt.username, s.mqtt.password = OPERATOR, SecretStr(password)
    return Where(s, run, data_dir_from, site_from, broker_from, access)
