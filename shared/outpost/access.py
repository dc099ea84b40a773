"""Who may use a site's broker and for what: one table of principals, generated into Mosquitto's
password file and ACL file, never written by hand (docs/security.md).

The principals of a site:

- each **service** (user ``svc.{name}``): what it subscribes to and publishes, from
  :data:`SERVICE_TOPICS` (the core cannot import a service, so the names come from the caller, the
  registry's ``OutpostSettings.SERVICES``), plus what every service does (metrics, status, dead
  letters, its own control topics). A service this table does not know gets only those;
- the **operator** (user ``outpost.cli``): the ``outpost`` commands that read the site (status, live
  views) and publish (escalation replies, agents' desired state);
- each enrolled **device** (user = the device id): publishes only its own telemetry and status, reads
  only its own commands.

The user names of services and of the operator hold a ``.``, which a device id cannot
(``[A-Za-z0-9_-]``), so a device can never take a service's name. Every rule sits under the site's
root (``{prefix}/v1/{site}/``): nobody reads another site. Anonymous clients are refused.

Credentials live in the site's folder, ``{data_dir}/sites/{site}/broker/`` (0700): a random password
per service and for the operator, one 0600 file each under ``credentials/``; the site key
(``site.key``, 0600) from which each device's password is derived (HMAC-SHA256), so the simulator and
``outpost broker enroll`` can give a device its password without storing it; ``devices``, the
enrolled device ids. The password file holds only salted PBKDF2-SHA512 hashes in Mosquitto's ``$7$``
format (written here with hashlib: no ``mosquitto_passwd`` needed).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import pwd
import secrets
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from outpost.errors import ConfigError
from outpost.topics import VERSION, Topics, check_segment

Access = Literal["read", "write", "readwrite"]

ITERATIONS = 101
"""Mosquitto 2.0's own ``mosquitto_passwd`` count: every CONNECT pays it once."""
SALT_BYTES = 12
OPERATOR = "outpost.cli"
"""The operator's user: the ``outpost`` commands."""
CLOUD_USER = "outpost.cloud"
"""The cloud side's user on the cloud broker (``outpost cloud run``)."""
FOLDER = "broker"
"""The credentials' folder under the site's folder."""
PID_FILE = "mosquitto.pid"


def service_user(name: str) -> str:
    return f"svc.{check_segment(name, 'service')}"


def bridge_user(site: str) -> str:
    """A site's uplink bridge's user on the cloud broker."""
    return f"bridge.{check_segment(site, 'site')}"


@dataclass(frozen=True, slots=True)
class Rule:
    access: Access
    topic: str


@dataclass(frozen=True, slots=True)
class Principal:
    user: str
    kind: Literal["service", "operator", "device", "bridge", "cloud"]
    rules: tuple[Rule, ...]


# --- the rules --------------------------------------------------------------------------------------

SERVICE_TOPICS: dict[str, tuple[tuple[Access, str], ...]] = {
    # topics under the site's root; "$uplink" stands for the bridge's state topic
    "ingest": (("read", "dev/#"), ("write", "events/+")),
    "inference": (("read", "events/+"), ("write", "inference/+/+")),
    "memory": (
        ("read", "events/+"),
        ("read", "inference/+/+"),
        ("read", "decisions/+"),
        ("read", "escalations/+"),
        ("read", "escalations/+/+/reply"),
        ("read", "actions/+"),
        ("read", "actions/+/results"),
        ("read", "dlq/+"),
        ("read", "memory/req/+"),
        ("write", "memory/resp/+"),
        # memory sync, handed to the uplink service's outbox
        ("write", "outbox/memory/+"),
        ("read", "outbox/memory/+/ack"),
    ),
    "agents": (
        ("read", "events/+"),
        ("read", "inference/+/+"),
        ("read", "decisions/+"),
        ("read", "actions/+/results"),
        ("read", "escalations/+/+/reply"),
        ("write", "decisions/+"),
        ("write", "escalations/+"),
        ("write", "actions/+"),
    ),
    "connectors": (
        ("read", "actions/+"),
        ("write", "actions/+/results"),
        ("write", "dev/+/cmd/#"),
    ),
    "telemetry": (
        # the service and its status page (the site monitor)
        ("read", "metrics/+"),
        ("read", "svc/+/status"),
        ("read", "events/+"),
        ("read", "inference/+/+"),
        ("read", "dlq/+"),
        ("read", "dev/+/status"),
        ("read", "control/+/reported"),
        ("read", "$uplink"),
        ("write", "telemetry/alerts"),
        ("write", "telemetry/rollups"),
    ),
    "uplink": (
        ("read", "telemetry/alerts"),
        ("read", "telemetry/rollups"),
        ("read", "decisions/+"),
        ("read", "escalations/+"),
        ("read", "actions/+/results"),
        ("read", "events/+"),
        ("read", "down/#"),
        ("read", "$uplink"),
        ("write", "up/#"),
        # memory sync's streams, taken into the outbox
        ("read", "outbox/memory/+"),
        ("write", "outbox/memory/+/ack"),
        # the downlink (outpost.downlink): desired state, and what a command becomes on the site
        ("write", "control/+/desired"),
        ("write", "escalations/+/+/reply"),
        ("write", "actions/+"),
    ),
}
"""What each service reads and writes beyond what every service does (:func:`service_rules`): its
subscriptions and publishes, read off its code. A new service adds its row here."""

OPERATOR_TOPICS: tuple[tuple[Access, str], ...] = (
    # outpost status / up / demo (the site monitor) and outpost agents (retained reports)
    ("read", "events/+"),
    ("read", "inference/+/+"),
    ("read", "dlq/+"),
    ("read", "dev/+/status"),
    ("read", "svc/+/status"),
    ("read", "metrics/+"),
    ("read", "control/+/reported"),
    ("read", "escalations/+"),
    ("read", "$uplink"),
    # outpost escalations reply; outpost agents stop/resume (reads the retained desired state first)
    ("write", "escalations/+/+/reply"),
    ("readwrite", "control/+/desired"),
    # an operator's own tools asking the memory service (MemoryClient)
    ("write", "memory/req/+"),
    ("read", "memory/resp/+"),
)


def _resolve(topics: Topics, rules: Iterable[tuple[Access, str]]) -> tuple[Rule, ...]:
    return tuple(
        Rule(access, topics.uplink_state() if rel == "$uplink" else f"{topics.root}/{rel}")
        for access, rel in rules
    )


def service_rules(topics: Topics, name: str) -> tuple[Rule, ...]:
    """``name``'s rules: its row of :data:`SERVICE_TOPICS` and what every service does (metrics,
    retained status with its last will, dead letters, its own desired and reported state)."""
    common: tuple[tuple[Access, str], ...] = (
        ("write", f"metrics/{name}"),
        ("write", f"svc/{name}/status"),
        ("write", f"dlq/{name}"),
        ("read", f"control/{name}/desired"),
        ("readwrite", f"control/{name}/reported"),
    )
    return _resolve(topics, (*SERVICE_TOPICS.get(name, ()), *common))


def device_rules(topics: Topics, device: str) -> tuple[Rule, ...]:
    """A device publishes only its own telemetry and status and reads only its own commands."""
    return (
        Rule("write", topics.telemetry(device)),
        Rule("write", topics.device_status(device)),
        Rule("read", f"{topics.root}/dev/{device}/cmd/#"),
    )


def site_principals(topics: Topics, services: Iterable[str], devices: Iterable[str]) -> list[Principal]:
    """The table: every service, the operator, every enrolled device."""
    out = [Principal(service_user(s), "service", service_rules(topics, s)) for s in services]
    out.append(Principal(OPERATOR, "operator", _resolve(topics, OPERATOR_TOPICS)))
    out += [Principal(check_segment(d, "device"), "device", device_rules(topics, d)) for d in devices]
    return out


def cloud_principals(prefix: str, sites: Iterable[str]) -> list[Principal]:
    """The cloud broker's table for a fleet: each site's bridge writes only its own ``up/#`` and
    reads only its own ``down/#``; the cloud side reads every site's ``up/#`` and writes ``down/#``."""
    out = []
    for site in sites:
        root = Topics(site=site, prefix=prefix).root
        out.append(
            Principal(
                bridge_user(site), "bridge", (Rule("write", f"{root}/up/#"), Rule("read", f"{root}/down/#"))
            )
        )
    wide = f"{check_segment(prefix, 'prefix')}/{VERSION}/+"
    out.append(
        Principal(CLOUD_USER, "cloud", (Rule("read", f"{wide}/up/#"), Rule("write", f"{wide}/down/#")))
    )
    return out


def rules_markdown() -> str:
    """The table of docs/security.md: every principal's reads and writes under ``{root}/``, for
    the registry's services as the caller names them and an example device."""
    t = Topics(site="SITE")
    root = t.root + "/"

    def short(topic: str) -> str:
        return "`" + topic.removeprefix(root).replace(t.uplink_state(), "$SYS/.../uplink/state") + "`"

    rows = ["| user | kind | reads | writes |", "| --- | --- | --- | --- |"]
    for p in site_principals(t, SERVICE_TOPICS, ["DEVICE"]):
        reads = ", ".join(short(r.topic) for r in p.rules if r.access != "write")
        writes = ", ".join(short(r.topic) for r in p.rules if r.access != "read")
        rows.append(f"| `{p.user}` | {p.kind} | {reads} | {writes} |")
    return "\n".join(rows) + "\n"


# --- the files --------------------------------------------------------------------------------------


def hash_password(password: str, salt: bytes | None = None) -> str:
    """Mosquitto 2.0's ``$7$`` hash: PBKDF2-HMAC-SHA512, 101 rounds, 12-byte salt, base64."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return f"$7${ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def passwd_text(passwords: Mapping[str, str]) -> str:
    """The password file: one ``user:$7$...`` line each (hashes only)."""
    for user in passwords:
        if not user or ":" in user or any(c.isspace() for c in user):
            raise ValueError(f"a broker user name cannot hold ':' or spaces: {user[:64]!r}")
    return "".join(f"{user}:{hash_password(pw)}\n" for user, pw in passwords.items())


def acl_text(principals: Iterable[Principal]) -> str:
    """The ACL file: one ``user`` section per principal. No ``pattern`` lines (they would apply to
    every user) and nothing before the first ``user`` line (that would be the anonymous user's)."""
    lines = ["# generated by outpost.access: do not edit (docs/security.md)"]
    for p in principals:
        lines += ["", f"user {p.user}"]
        lines += [f"topic {r.access} {r.topic}" for r in p.rules]
    return "\n".join(lines) + "\n"


def _write_private(path: Path, text: str, owner_of: Path | None = None) -> None:
    """Write ``path`` 0600 (created so: never readable by others, not even for a moment); with
    ``owner_of``, give it that folder's owner (the broker, dropped to the user mosquitto, rereads
    its files on SIGHUP)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)
    if owner_of is not None:
        st = owner_of.stat()
        with contextlib.suppress(OSError):
            os.chown(path, st.st_uid, st.st_gid)


def write_broker_files(
    workdir: Path, passwords: Mapping[str, str], acl: str | None
) -> tuple[Path, Path | None]:
    """The broker's password file (and ACL file) in its folder, made if missing; their paths. Each
    is written beside and renamed over the old one: a broker that rereads them (on SIGHUP, or
    compose's, which watches its folder: compose/mosquitto-run.sh) never reads half a file."""
    workdir.mkdir(parents=True, exist_ok=True)

    def put(name: str, text: str) -> Path:
        tmp, path = workdir / f".{name}.tmp", workdir / name
        _write_private(tmp, text, owner_of=workdir)
        os.replace(tmp, path)
        return path

    return put("passwd", passwd_text(passwords)), None if acl is None else put("acl", acl)


def asks_passwords(workdir: Path, address: str) -> bool:
    """Whether the broker config in ``workdir`` (``outpost up``'s) listens on ``address``
    (HOST:PORT) and checks passwords: then the commands aimed there use the site's credentials.
    False for an external broker (``outpost up --broker``), one with auth off, or no config."""
    try:
        lines = (workdir / "mosquitto.conf").read_text().splitlines()
    except OSError:
        return False
    host, _, port = address.rpartition(":")
    return f"listener {port} {host}" in lines and any(line.startswith("password_file ") for line in lines)


def reload_broker(workdir: Path) -> bool:
    """SIGHUP the broker of ``workdir`` (its pid file): Mosquitto rereads its password and ACL files.
    False when no broker runs there."""
    try:
        pid = int((workdir / PID_FILE).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return False
    return True


# --- a site's credentials -------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteAccess:
    """A site's credentials folder (``{site folder}/broker``) and the table made from it."""

    folder: Path
    topics: Topics

    @classmethod
    def of(cls, site_folder: Path, topics: Topics) -> SiteAccess:
        return cls(Path(site_folder) / FOLDER, topics)

    @property
    def exists(self) -> bool:
        return (self.folder / "credentials" / OPERATOR).is_file()

    def _ensure_folder(self) -> None:
        (self.folder / "credentials").mkdir(parents=True, exist_ok=True, mode=0o700)
        self.folder.chmod(0o700)

    def _key(self) -> bytes:
        path = self.folder / "site.key"
        if not path.exists():
            self._ensure_folder()
            _write_private(path, secrets.token_hex(32) + "\n")
        return path.read_text().strip().encode()

    def device_password(self, device: str) -> str:
        """The device's password: HMAC-SHA256 of its id under the site key (never stored)."""
        check_segment(device, "device")
        mac = hmac.new(self._key(), f"device:{device}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def password(self, user: str) -> str:
        """The password of a service or of the operator: made at random once, kept 0600."""
        path = self.folder / "credentials" / user
        if not path.exists():
            self._ensure_folder()
            _write_private(path, secrets.token_urlsafe(24) + "\n")
        return path.read_text().strip()

    def known_password(self, user: str) -> str | None:
        """The stored password of ``user``; None when the site has none (nothing is created)."""
        path = self.folder / "credentials" / user
        try:
            return path.read_text().strip()
        except OSError:
            return None

    def services(self) -> list[str]:
        """The services that have credentials here (what the last ``outpost up`` ran)."""
        folder = self.folder / "credentials"
        if not folder.is_dir():
            return []
        return sorted(p.name[len("svc.") :] for p in folder.iterdir() if p.name.startswith("svc."))

    def devices(self) -> list[str]:
        path = self.folder / "devices"
        if not path.exists():
            return []
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    def enroll(self, devices: Iterable[str]) -> list[str]:
        """Add devices to the enrolled list; the ones that were not there."""
        have = self.devices()
        new = [check_segment(d, "device") for d in dict.fromkeys(devices) if d not in have]
        if new:
            self._ensure_folder()
            _write_private(self.folder / "devices", "".join(f"{d}\n" for d in [*have, *new]))
        return new

    def principals(self, services: Iterable[str]) -> list[Principal]:
        return site_principals(self.topics, services, self.devices())

    def passwords(self, services: Iterable[str]) -> dict[str, str]:
        """Every principal's password (made where missing): what the password file hashes."""
        self._key()  # made with the rest: the devices enrolled later derive from it
        out: dict[str, str] = {}
        for p in self.principals(services):
            out[p.user] = self.device_password(p.user) if p.kind == "device" else self.password(p.user)
        return out

    def write(self, workdir: Path, services: Iterable[str]) -> None:
        """(Re)write the broker's password and ACL files in ``workdir`` from the table (the folder of
        ``outpost up``'s own broker, or ``broker.files``, which compose's broker watches)."""
        names = list(services)
        write_broker_files(workdir, self.passwords(names), acl_text(self.principals(names)))

    def enroll_and_reload(self, workdir: Path, devices: Iterable[str], *, watched: bool = False) -> list[str]:
        """Enroll ``devices`` and, when some are new, rewrite the running broker's files (for the
        services of its last start) and have it reread them; the devices that were new. ``watched``:
        ``workdir`` is ``broker.files``, whose broker rereads the files itself when they change (it
        runs in another container, where no signal of ours reaches)."""
        new = self.enroll(devices)
        if new and (watched or (workdir / "passwd").exists()):
            self.write(workdir, self.services())
            if not watched and not reload_broker(workdir):
                raise ConfigError(f"enrolled {len(new)} device(s), but no broker runs in {workdir} to reload")
        return new


# --- the cloud broker of a fleet ------------------------------------------------------------------


@dataclass(frozen=True)
class CloudBroker:
    """The cloud broker's config for a fleet of sites (``outpost cloud broker-config``): a listener
    (TLS optional), the password file and the ACL of :func:`cloud_principals`, persistence and
    queues sized for bridges that catch up after an outage. Passwords are made once per user and
    kept 0600 under ``credentials/``, so a second run (a site added) keeps the others'."""

    folder: Path
    prefix: str
    sites: tuple[str, ...]
    host: str = "0.0.0.0"
    port: int = 1883
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_certificate: bool = False
    run_as: str | None = None
    """Mosquitto's ``user``: who it runs as when started as root (None: its default, mosquitto)."""

    def credentials(self, user: str) -> Path:
        return self.folder / "credentials" / user

    def _password(self, user: str) -> str:
        path = self.credentials(user)
        if not path.exists():
            _write_private(path, secrets.token_urlsafe(24) + "\n")
        return path.read_text().strip()

    def config(self) -> str:
        f = self.folder.resolve()
        lines = [
            "# generated by outpost cloud broker-config: do not edit (docs/security.md)",
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
        ]
        if self.tls_cert is not None and self.tls_key is not None:
            lines += [f"certfile {self.tls_cert}", f"keyfile {self.tls_key}", "tls_version tlsv1.2"]
            if self.tls_ca is not None:
                lines.append(f"cafile {self.tls_ca}")
            lines.append(f"require_certificate {'true' if self.require_certificate else 'false'}")
        lines += [
            "allow_anonymous false",
            f"password_file {f / 'passwd'}",
            f"acl_file {f / 'acl'}",
            "persistence true",
            f"persistence_location {f / 'data'}/",
            "autosave_interval 60",
            "max_queued_messages 1000000",  # Mosquitto's default (1000) drops what a bridge queues
            "max_inflight_messages 1000",
            "persistent_client_expiration 7d",
            "set_tcp_nodelay true",
            f"log_dest file {f / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages true",
        ]
        if self.run_as is not None:
            lines.append(f"user {self.run_as}")
        return "\n".join(lines) + "\n"

    def write(self) -> Path:
        """Write ``mosquitto.conf``, ``passwd``, ``acl`` and the credentials; the config's path."""
        for site in self.sites:
            check_segment(site, "site")
        paths = (self.tls_ca, self.tls_cert, self.tls_key)
        for value in (self.host, self.run_as, *(str(p) for p in paths if p is not None)):
            if value is not None and (not value or any(c.isspace() for c in value)):
                raise ConfigError(f"a broker config value cannot be empty or hold spaces: {value[:100]!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both a certificate and its key")
        (self.folder / "credentials").mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.folder / "data").mkdir(exist_ok=True)
        principals = cloud_principals(self.prefix, self.sites)
        passwords = {p.user: self._password(p.user) for p in principals}
        _write_private(self.folder / "passwd", passwd_text(passwords))
        _write_private(self.folder / "acl", acl_text(principals))
        conf = self.folder / "mosquitto.conf"
        _write_private(conf, self.config())
        self._hand_to_broker_user()
        return conf

    def _hand_to_broker_user(self) -> None:
        """Mosquitto started as root drops to ``run_as`` (``mosquitto``) before it reads its
        password file and ACL and writes its log and data: give that user the folder and those files
        (never ``credentials/``, which only the operator reads)."""
        if os.geteuid() != 0:
            return
        try:
            pw = pwd.getpwnam(self.run_as or "mosquitto")
        except KeyError:
            return
        for path in (
            self.folder,
            self.folder / "mosquitto.conf",
            self.folder / "passwd",
            self.folder / "acl",
        ):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        for path in [self.folder / "data", *(self.folder / "data").rglob("*")]:
            os.chown(path, pw.pw_uid, pw.pw_gid)
