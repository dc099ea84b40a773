"""Start and stop a Mosquitto of our own: for tests, the demo and ``outpost up``.

Every instance gets a generated config in its own directory: loopback listener on a free (or given)
port, persistence, TCP_NODELAY, queue limits raised from Mosquitto's lossy defaults (1000 queued
messages per client), and optional password auth and ACL. It never touches the system broker.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from outpost.access import PID_FILE, write_broker_files
from outpost.errors import BrokerError
from outpost.log import get_logger
from outpost.process import end_process
from outpost.settings import BrokerSettings, MqttSettings, UplinkSettings
from outpost.topics import Topics

log = get_logger("outpost.broker")


PORT_FILE = "port"
"""In the broker's folder: the port it listens on, kept for its next start (:func:`port_of_last_run`)."""

LISTEN_PORTS = (20000, 32767)
"""Where :func:`free_port` looks: below Linux's default ephemeral range (32768-60999). A port the
kernel hands out (``bind`` to 0) is in that range, and so can be taken by an outgoing connection's
local end while its broker is down: a restarted test broker then failed with "Address already in
use" (the uplink benchmark's cloud broker did, once)."""


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback TCP port free now, outside the range the kernel gives outgoing connections (a
    broker stopped and started again gets its port back), picked at random so that processes
    picking at once rarely try the same one; the kernel's own pick where that range is all taken."""
    lo, hi = LISTEN_PORTS[0], min(LISTEN_PORTS[1], _ephemeral_low() - 1)
    for _ in range(100 if hi > lo else 0):
        port = random.randint(lo, hi)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def can_listen(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` now (as the broker and uvicorn bind it, with
    SO_REUSEADDR: a port a stopped process left in TIME_WAIT counts as free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_of_last_run(workdir: Path, host: str) -> int:
    """The port the broker of ``workdir`` listened on when it last started, if it is free now
    (0: none): a site restarted with ``broker.port`` 0 keeps its address, so its devices, a
    simulator still running and scripts that found it once keep finding it."""
    try:
        port = int((workdir / PORT_FILE).read_text())
    except (OSError, ValueError):
        return 0
    return port if 0 < port < 65536 and can_listen(host, port) else 0


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_WATCHDOG = """
import os, signal, sys, time
parent, child = int(sys.argv[1]), int(sys.argv[2])
def wait(until, step):
    while until():
        time.sleep(step)
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            sys.exit(0)
wait(lambda: os.getppid() == parent, 0.5)
os.kill(child, signal.SIGTERM)
deadline = time.monotonic() + 10
wait(lambda: time.monotonic() < deadline, 0.1)
os.kill(child, signal.SIGKILL)
"""
"""Stops the broker when the process that started it dies, even by kill -9. PR_SET_PDEATHSIG
cannot: Mosquitto started as root drops to the user mosquitto, and a change of credentials clears
it. So a small process whose parent is the starter polls it, and when it is gone (the watchdog was
re-parented) sends the broker SIGTERM (it saves its persistence), then SIGKILL 10 s later."""


def check_broker(mqtt: MqttSettings, timeout_s: float = 5.0) -> None:
    """Connect to the broker once as a service would (MQTT CONNECT with the settings' credentials)
    and leave; :class:`BrokerError` in one line when nothing listens or it refuses. ``outpost up
    --broker`` asks before it starts anything, so a wrong address fails in seconds, not after every
    service has given up on it."""
    where = f"{mqtt.host}:{mqtt.port}"
    try:
        socket.getaddrinfo(mqtt.host, mqtt.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise BrokerError(
            f"no MQTT broker at {where}: the name {mqtt.host!r} does not resolve ({exc})"
        ) from None
    if not port_open(mqtt.host, mqtt.port, timeout=min(2.0, timeout_s)):
        raise BrokerError(f"no MQTT broker at {where}: nothing accepts connections there")
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"outpost-check-{os.getpid()}",
        protocol=MQTTProtocolVersion.MQTTv311,
    )
    if mqtt.username is not None:
        password = mqtt.password.get_secret_value() if mqtt.password is not None else None
        client.username_pw_set(mqtt.username, password)
    answer: list[Any] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: answer.append(reason)
    try:
        client.connect(mqtt.host, mqtt.port, keepalive=10)
        deadline = time.monotonic() + timeout_s
        while not answer and time.monotonic() < deadline:
            if client.loop(timeout=0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
    except OSError as exc:
        raise BrokerError(f"cannot connect to the MQTT broker at {where}: {exc}") from None
    finally:
        with contextlib.suppress(OSError):
            client.disconnect()
    if not answer:
        raise BrokerError(f"{where} accepts connections but does not answer as an MQTT broker")
    if answer[0].is_failure:
        raise BrokerError(f"the MQTT broker at {where} refused the connection: {answer[0]}")


def uplink_bridge(topics: Topics, uplink: UplinkSettings) -> list[str]:
    """Mosquitto config lines for the site's store-and-forward bridge to the cloud broker.

    ``up/#`` goes out and ``down/#`` comes in at QoS 1; the bridge's session is persistent
    (``cleansession false``), so this broker queues for it while the link is down and the cloud
    broker queues what comes down. Mosquitto reports the link, retained, on
    :meth:`Topics.uplink_state` (``1`` up, ``0`` down) on this broker only. A PUBACK on either side
    is not delivery (a broker can lose what it acknowledged): whoever needs end-to-end delivery
    waits for the other end's own acknowledgement, as memory sync does.
    """
    if not uplink.cloud:
        return []
    name = f"{topics.prefix}-{topics.site}-uplink"
    lines = [
        f"connection {name}",
        f"address {uplink.cloud}",
        f"remote_clientid {name}",
        "cleansession false",
        "notifications true",
        "notifications_local_only true",
        "bridge_protocol_version mqttv311",
        "try_private false",
        "keepalive_interval 10",
        "restart_timeout 1 15",
        f"topic {topics.all_up} out 1",
        f"topic {topics.all_down} in 1",
    ]
    if uplink.username:
        lines.append(f"remote_username {uplink.username}")
    if uplink.password is not None:
        lines.append(f"remote_password {uplink.password.get_secret_value()}")
    if uplink.ca is not None:  # TLS to the cloud broker; its certificate must name the host
        lines += [f"bridge_cafile {uplink.ca}", "bridge_insecure false", "bridge_tls_version tlsv1.2"]
    if uplink.cert is not None and uplink.key is not None:
        lines += [f"bridge_certfile {uplink.cert}", f"bridge_keyfile {uplink.key}"]
    return lines  # every value was checked by UplinkSettings: one token each, no line breaks


@dataclass
class Mosquitto:
    """A Mosquitto process with its own config, data and log in ``workdir``."""

    workdir: Path
    settings: BrokerSettings = field(default_factory=BrokerSettings)
    users: dict[str, str] = field(default_factory=dict)
    """user -> password: the password file (hashes) and ``allow_anonymous false``; empty: anyone."""
    acl: list[str] | None = None
    extra_conf: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    die_with_parent: bool = False
    """Stop the broker when this process dies, even by kill -9 (``outpost up``'s broker)."""
    proc: subprocess.Popen[bytes] | None = None
    _watchdog: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        if not self.port:
            self.port = self.settings.port or port_of_last_run(self.workdir, self.host) or free_port()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def write_config(self) -> Path:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        s = self.settings
        lines = [
            "# generated by outpost.broker: do not edit",
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            "persistence true",
            f"persistence_location {data}/",
            f"autosave_interval {s.autosave_interval_s}",
            f"max_queued_messages {s.max_queued_messages}",
            f"max_inflight_messages {s.max_inflight_messages}",
            # MQTT 3.1.1 sessions of services (ingest) must outlive a restart, not accumulate forever
            "persistent_client_expiration 7d",
            f"max_packet_size {s.message_size_limit + 1024}" if s.message_size_limit else "",
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
            f"pid_file {self.workdir / PID_FILE}",  # outpost broker enroll reloads it (SIGHUP)
        ]
        if self.users:
            acl = None if self.acl is None else "\n".join(self.acl) + "\n"
            pwfile, aclfile = write_broker_files(self.workdir, self.users, acl)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
            if aclfile is not None:
                lines.append(f"acl_file {aclfile}")
        else:
            lines.append("allow_anonymous true")
            if self.acl is not None:
                aclfile = self.workdir / "acl"
                aclfile.write_text("\n".join(self.acl) + "\n")
                lines.append(f"acl_file {aclfile}")
        lines += self._tls_listener()
        if not self._hand_to_broker_user():
            lines.append("user root")
        lines += self.extra_conf
        conf = self.workdir / "mosquitto.conf"
        conf.touch(mode=0o600)  # it may hold the uplink's password
        conf.chmod(0o600)
        conf.write_text("\n".join(line for line in lines if line) + "\n")
        st = self.workdir.stat()  # the broker, dropped to its user, rereads it on SIGHUP (enrolment)
        with contextlib.suppress(OSError):
            os.chown(conf, st.st_uid, st.st_gid)
        return conf

    def _tls_listener(self) -> list[str]:
        """A TLS listener for devices (``broker.tls_port``), the same users and ACL as the plain one;
        with ``require_certificate`` a client must show a certificate signed by ``tls_ca``."""
        s = self.settings
        if not s.tls_port:
            return []
        lines = [
            f"listener {s.tls_port} {self.host}",
            f"certfile {s.tls_cert}",
            f"keyfile {s.tls_key}",
            "tls_version tlsv1.2",
        ]
        if s.tls_ca is not None:
            lines.append(f"cafile {s.tls_ca}")
        lines.append(f"require_certificate {'true' if s.require_certificate else 'false'}")
        return lines

    def _hand_to_broker_user(self) -> bool:
        """Mosquitto started as root drops to the user ``mosquitto``; without access to its
        persistence directory it logs "Permission denied" and runs on *without persistence*.
        Give it the workdir; if a parent folder is closed to it (pytest's and mkdtemp's folders are
        0700), return False so the broker keeps running as root rather than silently losing data."""
        if os.geteuid() != 0:
            return True
        try:
            pw = pwd.getpwnam("mosquitto")
        except KeyError:
            return False
        for parent in self.workdir.parents:
            st = parent.stat()
            if not (st.st_mode & 0o001 or (st.st_uid == pw.pw_uid and st.st_mode & 0o100)):
                log.warning(
                    f"the broker runs as root, not as the user mosquitto, which cannot enter "
                    f"{parent} (mode {st.st_mode & 0o777:03o}) on the way to its folder; to run it "
                    f"unprivileged, open that folder to others (chmod o+x {parent}) or give a data "
                    "folder (--data-dir) whose parents others may enter",
                    extra={"closed_folder": str(parent)},
                )
                return False
        for path in [self.workdir, *self.workdir.rglob("*")]:
            with contextlib.suppress(OSError):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        return True

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        binary = shutil.which(self.settings.binary)
        if binary is None:
            raise BrokerError(f"{self.settings.binary} not found: install the Debian package 'mosquitto'")
        if self.running:
            return self
        if port_open(self.host, self.port):
            # Readiness is "the port accepts connections": with another process already there, a
            # broker that fails to bind would pass for a started one.
            raise BrokerError(f"{self.address} is already in use by another process")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.write_config()
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                raise BrokerError(
                    f"mosquitto exited with {self.proc.returncode}: {err.strip()} {log[-2000:]}"
                )
            if port_open(self.host, self.port):
                (self.workdir / PORT_FILE).write_text(f"{self.port}\n")
                if self.die_with_parent:
                    self._watchdog = subprocess.Popen(
                        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.proc.pid)],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                return self
            time.sleep(0.02)
        self.kill()
        raise BrokerError(f"mosquitto did not listen on {self.address} within {timeout_s}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: Mosquitto saves its persistence file and exits."""
        if self.proc is not None:
            end_process(self.proc, timeout_s)
        self.proc = None
        self._reap_watchdog()

    def _reap_watchdog(self) -> None:
        """The watchdog exits within 0.5 s of the broker."""
        if self._watchdog is not None:
            try:
                self._watchdog.wait(5)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
            self._watchdog = None

    def kill(self) -> None:
        """SIGKILL: what a power cut does to the broker (loses what was not autosaved)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self._reap_watchdog()

    def restart(self, timeout_s: float = 10.0) -> None:
        self.stop()
        deadline = time.monotonic() + timeout_s
        while port_open(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.start(timeout_s)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
