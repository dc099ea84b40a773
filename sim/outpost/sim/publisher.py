"""One publisher process: a share of the fleet, one paho connection per device, one thread.

Why it is built this way:

* One MQTT connection per device, because a last will belongs to a connection: each device must
  own its retained ``.../status`` = offline will, and a drop must fire exactly that device's will.
* paho-mqtt driven by our own ``selectors`` loop instead of paho's thread per client: with tens
  to thousands of clients per process, threads would cost more than the publishing. paho's
  ``publish`` writes straight to the socket when no paho thread runs, so the hot path is one
  ``send`` per message; ``loop_read``/``loop_write``/``loop_misc`` serve acks, keepalives and
  back-pressure. No paho socket pair is created (that only happens in ``loop``/``loop_start``).
* Back-pressure, not buffering: a device whose socket is full (or with too many unacknowledged
  QoS 1 publishes) is skipped until the broker catches up, so memory stays flat at any rate.
* Pacing by :class:`~outpost.sim.pacing.Pacer`; every wait is a ``select`` with a timeout, so a
  paced run sleeps instead of spinning and still answers pings and acks.
* Churn drops a connection with a half-close (``shutdown(SHUT_WR)``) after the device's output is
  flushed and acknowledged: the broker reads everything sent, sees the connection end without a
  DISCONNECT, and publishes the will. Nothing counted as sent is lost, so counts stay exact.
"""

from __future__ import annotations

import contextlib
import math
import random
import selectors
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from outpost.access import SiteAccess
from outpost.contracts import SCHEMA_VERSION, new_id, now_ns
from outpost.errors import BrokerError
from outpost.sim.churn import Churn
from outpost.sim.options import SimOptions
from outpost.sim.pacing import Pacer
from outpost.sim.report import ProfileCounts, WorkerReport
from outpost.sim.scenario import DeviceSpec, SimDevice
from outpost.sim.stream import DeviceStream
from outpost.topics import Topics

MAX_PENDING = 2000
"""Unacknowledged QoS 1 publishes per device before it waits (paho's message ids wrap at 65535)."""
BURST_ITEMS = 32
"""Items a device may send in a row when they are due. Consecutive small publishes on one socket
let TCP coalesce them (Nagle), where strict round-robin over many sockets pays a loopback segment
per message: with 50 devices, batch 1, this is the difference between ~6k and ~20k messages/s per
process."""
SERVE_EVERY_S = 0.01
"""How often the send loop serves the network and churn while it has work."""
MISC_EVERY_S = 1.0
"""How often keepalives are checked (paho's ``loop_misc``)."""
RETRY_S = 1.0
"""Wait before reconnecting a device the broker dropped (not a planned churn drop)."""

_OK = MQTTErrorCode.MQTT_ERR_SUCCESS


class Flag(Protocol):
    """A stop signal: ``threading.Event`` and ``multiprocessing.Event`` both fit."""

    def is_set(self) -> bool: ...


@dataclass(eq=False, slots=True)
class _Device:
    stream: DeviceStream
    client: paho.Client
    topic: str
    status_topic: str
    state: str = "new"  # new, connecting, online, draining, dropping, offline, closing, closed, refused
    sock: Any = None
    writing: bool = False  # registered for EVENT_WRITE because paho has output queued
    pending: int = 0  # QoS 1 publishes not yet acknowledged (counted only while acks are tracked)
    drop_at: float = math.inf
    reconnect_at: float = 0.0
    connects: int = 0
    refused: str = ""
    readings: int = 0
    messages: int = 0
    bad: Counter[str] = field(default_factory=Counter)

    @property
    def id(self) -> str:
        return self.stream.device.id


class Publisher:
    """Publishes a share of the fleet's devices until the duration, item quota or stop flag ends it."""

    def __init__(
        self,
        options: SimOptions,
        specs: list[DeviceSpec],
        *,
        index: int = 0,
        rate: float | None = None,
        quota: int | None = None,
    ) -> None:
        """``rate`` is this process's share of items/s (default: all of ``options.rate``), ``quota``
        its share of ``options.readings`` (None: no limit)."""
        if not specs:
            raise ValueError("a publisher needs at least one device")
        self.o = options
        self.index = index
        self.rate = options.rate if rate is None else rate
        self.quota = quota
        self.topics = Topics(site=options.site, prefix=options.prefix)
        self.sel = selectors.DefaultSelector()
        self.churn = Churn(random.Random(f"outpost-sim-churn:{options.seed}:{index}"), options.churn)
        self.track_acks = options.qos > 0
        self.finishing = False
        self._closed = False
        self.access = None if options.credentials is None else SiteAccess(options.credentials, self.topics)
        self.report = WorkerReport(index=index, devices=len(specs))
        self.devices = [self._make(spec) for spec in specs]

    # --- set-up ----------------------------------------------------------------------------------
    def _make(self, spec: DeviceSpec) -> _Device:
        o = self.o
        device = SimDevice(spec, o.seed, anomaly_rate=o.anomaly_rate, seq_start=o.seq_start)
        stream = DeviceStream(
            device, seed=o.seed, batch=o.batch, bad_ratio=o.bad_ratio, bad_kinds=o.bad_kinds
        )
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"sim-{o.prefix}-{o.site}-{spec.id}",
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=True,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(MAX_PENDING)
        client.max_queued_messages_set(0)
        if self.access is not None:
            client.username_pw_set(spec.id, self.access.device_password(spec.id))
        elif o.username is not None:
            pw = o.password.get_secret_value() if o.password is not None else None
            client.username_pw_set(o.username, pw)
        d = _Device(stream, client, self.topics.telemetry(spec.id), self.topics.device_status(spec.id))
        client.user_data_set(d)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        if self.track_acks:
            client.on_publish = self._on_publish
        return d

    def _status(self, d: _Device, state: str, reason: str | None = None) -> bytes:
        body: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "id": new_id(),
            "ts": now_ns(),
            "trace": "",
            "device": d.id,
            "profile": d.stream.device.profile_name,
            "state": state,
        }
        if reason is not None:
            body["reason"] = reason
        return orjson.dumps(body)

    def _arm_will(self, d: _Device) -> None:
        d.client.will_set(d.status_topic, self._status(d, "offline", "connection lost"), qos=1, retain=True)

    def connect_all(self, timeout_s: float = 15.0) -> None:
        """Connect every device and wait for each CONNACK; BrokerError if any cannot."""
        o = self.o
        for d in self.devices:
            self._arm_will(d)
            d.state = "connecting"
            try:
                d.client.connect(o.host, o.port, keepalive=o.keepalive)
            except (OSError, ValueError) as exc:
                self.close()
                raise BrokerError(f"cannot connect to MQTT broker {o.broker}: {exc}") from None
        deadline = time.monotonic() + timeout_s
        while any(d.state == "connecting" for d in self.devices):
            if time.monotonic() > deadline:
                self.close()
                raise BrokerError(f"MQTT broker {o.broker} did not accept the devices within {timeout_s}s")
            self._serve(0.05)
        refused = [d for d in self.devices if d.state != "online"]
        if refused:
            d = refused[0]
            self.close()
            raise BrokerError(f"MQTT broker {o.broker} refused device {d.id}: {d.refused or d.state}")

    # --- paho callbacks (all run on this thread, inside loop_* or publish) -----------------------
    def _on_socket_open(self, _c: paho.Client, d: _Device, sock: Any) -> None:
        d.sock = sock
        d.writing = False
        if self.o.rate > 0:
            # Paced, each message should leave now: Nagle would hold it up to ~40 ms and the
            # end-to-end latency the demo reports would be the simulator's, not Outpost's.
            # Flat out (rate 0), Nagle's coalescing is what lets one process offer ~20k msgs/s.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sel.register(sock, selectors.EVENT_READ, d)

    def _on_socket_close(self, _c: paho.Client, d: _Device, sock: Any) -> None:
        if d.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(d.sock)
        d.sock = None
        d.writing = False

    def _on_connect(self, client: paho.Client, d: _Device, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            d.state, d.refused = "refused", str(reason)
            return
        d.state = "online"
        d.connects += 1
        if d.connects > 1:
            self.report.reconnects += 1
        self._publish(d, d.status_topic, self._status(d, "online"), qos=1, retain=True)
        d.drop_at = time.monotonic() + self.churn.next_drop_in()

    def _on_disconnect(self, _c: paho.Client, d: _Device, _flags: Any, _reason: Any, _props: Any) -> None:
        d.pending = 0  # clean session: nothing unacknowledged survives the connection
        if d.state == "refused":
            return
        if self.finishing:
            d.state = "closed"
            return
        now = time.monotonic()
        d.reconnect_at = now + (self.churn.offline_for() if d.state == "dropping" else RETRY_S)
        d.state = "offline"

    def _on_publish(self, _c: paho.Client, d: _Device, _mid: int, _rc: Any, _props: Any) -> None:
        if d.pending > 0:
            d.pending -= 1

    # --- network ---------------------------------------------------------------------------------
    def _publish(self, d: _Device, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> bool:
        info = d.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != _OK:
            self.report.publish_errors += 1
            return False
        if qos and self.track_acks:
            d.pending += 1
        if d.client.want_write():
            self._want_write(d)
        return True

    def _want_write(self, d: _Device) -> None:
        if not d.writing and d.sock is not None:
            d.writing = True
            self.sel.modify(d.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, d)

    def _serve(self, timeout: float) -> None:
        """Handle whatever the sockets have ready, waiting at most ``timeout`` seconds for it."""
        for key, events in self.sel.select(timeout):
            d: _Device = key.data
            client = d.client
            if events & selectors.EVENT_READ:
                client.loop_read()
            if events & selectors.EVENT_WRITE and d.sock is not None:
                client.loop_write()
            if d.writing and d.sock is not None and not client.want_write():
                d.writing = False
                self.sel.modify(d.sock, selectors.EVENT_READ, d)

    def _misc(self) -> None:
        for d in self.devices:
            if d.sock is not None:
                d.client.loop_misc()

    def _churn(self, now: float) -> None:
        for d in self.devices:
            state = d.state
            if state == "online" and now >= d.drop_at:
                d.state = state = "draining"  # no new publishes; flush and await acks first
            if state == "draining":
                if d.sock is None:
                    continue
                if not d.client.want_write() and d.pending == 0:
                    d.state = "dropping"
                    self.report.drops += 1
                    with contextlib.suppress(OSError):
                        d.sock.shutdown(socket.SHUT_WR)
            elif state == "offline" and now >= d.reconnect_at:
                self._arm_will(d)
                d.state = "connecting"
                try:
                    d.client.reconnect()
                except (OSError, ValueError):
                    d.state = "offline"
                    d.reconnect_at = now + RETRY_S

    # --- the run ---------------------------------------------------------------------------------
    def run(self, stop: Flag | None = None) -> WorkerReport:
        """Send until the duration passes, the quota is met or ``stop`` is set; then flush, wait
        for acknowledgements, publish each device's offline status and disconnect cleanly."""
        t0 = time.monotonic()
        self._send(t0, stop)
        self._settle(time.monotonic() + 10.0)
        self.report.elapsed_s = time.monotonic() - t0
        self.report.unacked = sum(d.pending for d in self.devices) if self.o.qos else 0
        self.close()
        return self._collect()

    def _send(self, t0: float, stop: Flag | None) -> None:
        o = self.o
        deadline = t0 + o.duration
        pacer = Pacer(self.rate, t0)
        quota = self.quota if self.quota is not None else 2**62
        batch, qos, track = o.batch, o.qos, self.track_acks
        burst = max(1, BURST_ITEMS // batch)
        devices = self.devices
        n = len(devices)
        rr = 0
        sent = 0
        next_serve = t0
        next_misc = t0 + MISC_EVERY_S
        report = self.report
        while sent < quota:
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_serve:
                self._serve(0)
                self._churn(now)
                if now >= next_misc:
                    self._misc()
                    next_misc = now + MISC_EVERY_S
                if stop is not None and stop.is_set():
                    break
                next_serve = now + SERVE_EVERY_S
            wait = pacer.wait_s(sent, now)
            if wait > 0:
                self._serve(min(wait, next_serve - now, deadline - now))
                continue
            d = None
            for _ in range(n):
                cand = devices[rr]
                rr += 1
                if rr == n:
                    rr = 0
                if cand.state == "online" and not cand.writing and cand.pending < MAX_PENDING:
                    d = cand
                    break
            if d is None:  # everyone is offline or waiting for the broker: wait for the network
                self._serve(min(0.005, max(0.0, deadline - now)))
                continue
            client = d.client
            take = d.stream.take
            topic = d.topic
            ts = time.time_ns()
            for _ in range(burst):
                slots = batch if quota - sent >= batch else quota - sent
                for m in take(slots, ts):
                    info = client.publish(topic, m.payload, qos=qos)
                    if info.rc != _OK:
                        report.publish_errors += 1
                        continue
                    d.messages += 1
                    d.readings += m.readings
                    if m.bad:
                        d.bad.update(m.bad)
                    if track:
                        d.pending += 1
                sent += slots
                if client.want_write():
                    self._want_write(d)
                    break
                if sent >= quota or (track and d.pending >= MAX_PENDING) or pacer.wait_s(sent, now) > 0:
                    break

    def _settle(self, deadline: float) -> None:
        """Flush every socket and wait for acks and half-finished connects or drops."""
        while time.monotonic() < deadline:
            busy = False
            for d in self.devices:
                if d.state in ("connecting", "dropping") or (
                    d.sock is not None and (d.client.want_write() or d.pending)
                ):
                    busy = True
                    break
            if not busy:
                return
            self._serve(0.01)

    def close(self, timeout_s: float = 5.0) -> None:
        """Say offline (retained) for every connected device, then disconnect cleanly."""
        if self._closed:
            return
        self._closed = True
        self.finishing = True
        if not self.track_acks:
            self.track_acks = True
            for d in self.devices:
                d.pending = 0
                d.client.on_publish = self._on_publish
        live = [d for d in self.devices if d.sock is not None and d.state in ("online", "draining")]
        for d in live:
            self._publish(d, d.status_topic, self._status(d, "offline", "shutdown"), qos=1, retain=True)
        deadline = time.monotonic() + timeout_s
        while any(d.pending and d.sock is not None for d in live) and time.monotonic() < deadline:
            self._serve(0.01)
        for d in self.devices:
            if d.sock is not None:
                d.state = "closing"
                d.client.disconnect()
                if d.client.want_write():
                    self._want_write(d)
        while any(d.sock is not None for d in self.devices) and time.monotonic() < deadline:
            self._serve(0.01)
        for d in self.devices:
            if d.sock is not None:
                with contextlib.suppress(OSError):
                    d.sock.close()
                self._on_socket_close(d.client, d, d.sock)
        self.sel.close()

    def _collect(self) -> WorkerReport:
        r = self.report
        for d in self.devices:
            r.readings += d.readings
            r.messages += d.messages
            r.bad.update(d.bad)
            name = d.stream.device.profile_name
            c = r.per_profile.setdefault(name, ProfileCounts())
            c.devices += 1
            c.readings += d.readings
            c.messages += d.messages
            c.bad += sum(d.bad.values())
            c.anomalies += sum(d.stream.device.anomalies.values())
            r.anomalies.update(d.stream.device.anomalies)
        return r
