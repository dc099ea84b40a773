"""The whole site on one machine: our own Mosquitto (or a given broker) plus every service,
supervised. ``outpost up`` and ``outpost demo`` are thin layers over :class:`Stack`.

Starting takes the data folder (:class:`outpost.datadir.DataDirLock`: a second stack on the same
folder is refused, naming the first one's PID), refuses a folder of the layout before sites, checks
a given broker before anything starts (a wrong address fails in seconds), and writes the run file
once the broker listens. A given broker that reads its users from ``broker.files`` (compose's) gets
the password file and ACL written there, and the services their own users, as a broker of our own
does; ``outpost up`` then waits for it to answer rather than failing at once. The broker and every
service stop when the process that started them dies, even by kill -9; stopping releases the
folder on every path out, a failed start included.

The services are those of the settings' class (``SERVICES``: the service registry's
``OutpostSettings`` names every service) unless the caller gives its own; the core knows none."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from outpost.access import OPERATOR, SiteAccess, acl_text, service_user
from outpost.broker import Mosquitto, check_broker, uplink_bridge
from outpost.datadir import DataDirLock, refuse_legacy, site_dir
from outpost.errors import BrokerError, ConfigError
from outpost.log import get_logger
from outpost.settings import CoreSettings, parse_host_port
from outpost.supervisor import Supervisor, zygote_for
from outpost.zygote import Zygote

log = get_logger("outpost.stack")
BROKER_WAIT_S = 60.0
"""How long ``outpost up --broker`` with ``broker.files`` waits for that broker to take the files it
wrote (compose's starts Mosquitto once they appear, then rereads them within a second or two)."""


def parse_broker(value: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), with a clear error for anything else."""
    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise ConfigError(f"--broker: {exc}") from None


def _credentials(
    s: CoreSettings, services: dict[str, str], users: dict[str, str]
) -> dict[str, dict[str, str]]:
    """Each service's own user and password for its environment; none when the settings name a user
    (``OUTPOST_MQTT__USERNAME``/``PASSWORD`` win: every service then connects as that user)."""
    if s.mqtt.username is not None:
        return {}
    return {
        name: {
            "OUTPOST_MQTT__USERNAME": service_user(name),
            "OUTPOST_MQTT__PASSWORD": users[service_user(name)],
        }
        for name in services
    }


@dataclass
class Stack:
    settings: CoreSettings
    external_broker: str | None = None
    broker: Mosquitto | None = None
    supervisor: Supervisor | None = None
    zygote: Zygote | None = None
    services: dict[str, str] | None = None
    """name -> module run with ``python -m``; None: ``type(settings).SERVICES``."""
    env: dict[str, str] = field(default_factory=dict)
    """More settings for the services as ``OUTPOST_*`` variables (a benchmark's metrics interval):
    the services read theirs from the environment and the site file, not from ``settings``."""
    final_status: list[dict[str, object]] = field(default_factory=list)
    """The services' states and exit codes as the stop left them."""
    lock: DataDirLock | None = None
    status_page: str | None = None
    """The address the telemetry service will serve the status page on (``outpost up`` works it out
    before anything starts): written to the run file with the broker's, where ``outpost`` finds it."""

    @property
    def data_dir(self) -> Path:
        return Path(self.settings.data_dir).resolve()

    @property
    def site_dir(self) -> Path:
        """The running site's folder: its state, its broker's folder, its services' logs."""
        return site_dir(self.data_dir, self.settings.site)

    @property
    def log_dir(self) -> Path:
        return self.site_dir / "logs"

    def start(self) -> None:
        self.lock = DataDirLock(self.data_dir).acquire()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        s = self.settings
        refuse_legacy(self.data_dir)
        services = dict(type(s).SERVICES if self.services is None else self.services)
        # the zygote imports what the services share while the broker starts (outpost.zygote)
        preload = [type(s).PRELOAD[name] for name in services if name in type(s).PRELOAD]
        self.zygote = zygote_for(preload, self.env)
        child_env: dict[str, dict[str, str]] = {}
        users: dict[str, str] = {}
        if self.external_broker is not None:
            s.mqtt.host, s.mqtt.port = parse_broker(self.external_broker)
            if s.broker.files is not None and s.broker.auth:
                users, child_env = self._publish_broker_files(services)
            else:
                check_broker(s.mqtt)
        else:
            bridge = uplink_bridge(s.topics, s.uplink)
            acl: list[str] | None = None
            if s.broker.auth:
                access = SiteAccess.of(self.site_dir, s.topics)
                users = access.passwords(services)
                acl = acl_text(access.principals(services)).splitlines()
                child_env = _credentials(s, services, users)
            self.broker = Mosquitto(
                self.site_dir / "mosquitto",
                settings=s.broker,
                users=users,
                acl=acl,
                extra_conf=bridge,
                die_with_parent=True,
            ).start()
            s.mqtt.host, s.mqtt.port = self.broker.host, self.broker.port
            log.info(
                "broker started",
                extra={"address": self.broker.address, "uplink": s.uplink.cloud or "none"},
            )
        env = {
            "OUTPOST_SITE": s.site,
            "OUTPOST_PREFIX": s.prefix,
            "OUTPOST_DATA_DIR": str(self.data_dir),
            "OUTPOST_MQTT__HOST": s.mqtt.host,
            "OUTPOST_MQTT__PORT": str(s.mqtt.port),
            "OUTPOST_LOG_LEVEL": s.log_level,
        }
        if s.mqtt.username is not None:
            env["OUTPOST_MQTT__USERNAME"] = s.mqtt.username
        if s.mqtt.password is not None:
            env["OUTPOST_MQTT__PASSWORD"] = s.mqtt.password.get_secret_value()
        env.update(self.env)
        if OPERATOR in users and s.mqtt.username is None:
            # what runs in this process (outpost up's and the demo's live views) is the operator
            s.mqtt.username, s.mqtt.password = OPERATOR, SecretStr(users[OPERATOR])
        assert self.lock is not None
        self.lock.write_run(s.site, self.broker_address, self.status_page)
        self.supervisor = Supervisor(
            env=env, log_dir=self.log_dir, services=services, child_env=child_env, zygote=self.zygote
        )
        self.supervisor.start()

    def _publish_broker_files(
        self, services: dict[str, str]
    ) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
        """An external broker that reads its users from ``broker.files`` (compose's): write its
        password file and ACL there, as for a broker of our own, and wait for it to answer the
        operator (it may be starting: compose's waits for these very files); every user's password
        and each service's credentials."""
        s = self.settings
        assert s.broker.files is not None
        access = SiteAccess.of(self.site_dir, s.topics)
        users = access.passwords(services)
        access.write(Path(s.broker.files), services)
        log.info("broker files written", extra={"folder": str(s.broker.files), "users": len(users)})
        probe = s.mqtt.model_copy()
        if probe.username is None:
            probe.username, probe.password = OPERATOR, SecretStr(users[OPERATOR])
        deadline = time.monotonic() + BROKER_WAIT_S
        while True:
            try:
                check_broker(probe)
                break
            except BrokerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        return users, _credentials(s, services, users)

    @property
    def broker_address(self) -> str:
        return f"{self.settings.mqtt.host}:{self.settings.mqtt.port}"

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()  # its zygote with it
            self.final_status = self.supervisor.status()
            self.supervisor = None
        elif self.zygote is not None:
            self.zygote.stop()
        self.zygote = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
