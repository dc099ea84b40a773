"""The MQTT bus every service uses: paho-mqtt driven by one network thread of our own.

Why paho under our own loop rather than aiomqtt or FastStream (docs/bus.md has the figures): on
this class of machine paho receives ~40k msgs/s where aiomqtt manages ~9k and FastStream ~3k, and
ingest's hot path must not be where Outpost loses its speed. :mod:`outpost.aiobus` puts an asyncio
face on the same client for services that prefer ``async``.

What the loop adds to paho:

* reconnect with capped, fully jittered exponential backoff (a fleet that lost its broker does not
  reconnect in lock-step);
* subscriptions (QoS per subscription, shared subscriptions) re-made on every connect;
* TCP_NODELAY on the socket (paho never sets it; Nagle costs ~40 ms per request/reply);
* timers and one-shot calls (:meth:`Bus.every`, :meth:`Bus.call_later`) run on the network
  thread, so a service's handlers, flushes and commits share one thread and need no locks; the
  thread sleeps until the next of them is due or a packet or posted call wakes it, never polls
  (a site of eight idle services woke ~2,900 times a second on fixed ticks; docs/benchmarks.md);
* an optional retained status with a last will, and a drain that waits for unacknowledged
  publishes before disconnecting;
* publishes from any thread: only the network thread writes to the socket. (paho, driven by a loop
  of its own rather than ``loop_start``, writes a publish from the caller's thread; two writers at
  once lose packets, and a lost QoS 1 publish is never acknowledged);
* a handler that raises is logged and counted (``handler_errors``); the network thread lives on;
* a read gate: while it says no (a service's worker queue is full), the thread stops reading new
  packets but still writes, pings and runs timers and posted calls; unacknowledged QoS 1 messages
  then wait on the broker (backpressure);
* any number of publish-confirmation listeners;
* a publish backlog it reports (:attr:`Bus.backlogged`: ``max_pending`` QoS 1 publishes wait for
  the broker): the service kit then sheds what arrives at QoS 0, counted and dead-lettered, rather
  than let its output grow without bound. The thread never stops reading for it, since the
  broker's acknowledgements arrive on the same socket;
* while disconnected, calls posted from other threads (a stop) run at once, not after the next
  reconnect attempt (which can be ``reconnect_max_s`` away);
* packets read below paho (:mod:`outpost.packet_filter`): big reads instead of paho's three
  ``recv`` calls a packet, and a QoS 0 publish on a topic the service sheds (:meth:`Bus.set_shedder`)
  consumed before paho parses it, so a flood costs the network thread little.

paho's private attributes are used only through :mod:`outpost.paho_internals`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from outpost import paho_internals as internals
from outpost.backoff import backoff_delays
from outpost.errors import BrokerError
from outpost.packet_filter import FilteringSocket
from outpost.settings import MqttSettings

log = logging.getLogger("outpost.bus")

_REFUSED_CREDENTIALS = (0x86, 0x87)
"""CONNACK reasons no retry can change: bad user name or password, not authorized (paho maps
MQTT 3.1.1's return codes 4 and 5 to them)."""

Message = paho.MQTTMessage
Handler = Callable[[Message], None]


@dataclass(slots=True)
class _Subscription:
    pattern: str
    handler: Handler
    qos: int


@dataclass(slots=True)
class _Timer:
    interval: float
    fn: Callable[[], None]
    due: float = field(default=0.0)


@dataclass(slots=True)
class Later:
    """A one-shot call :meth:`Bus.call_later` scheduled; :meth:`Bus.cancel_later` drops it."""

    due: float
    seq: int
    fn: Callable[[], None]
    cancelled: bool = False

    def __lt__(self, other: Later) -> bool:
        return (self.due, self.seq) < (other.due, other.seq)

    def cancel(self) -> None:
        """Never run (a no-op once it has run)."""
        self.cancelled = True


class Alarm:
    """One pending wake-up for ``fn``, however often it is asked for: a service that has something
    falling due (a commit, a partial batch, a retry, a send) holds one Alarm rather than a
    ``Later`` and a flag of its own.

    :meth:`soon` keeps a wake-up already set (what asks meanwhile shares it: a flood's commits come
    in one go); :meth:`at` keeps the earlier of the two (the oldest item's deadline wins). ``later``
    schedules on the network thread (:meth:`Bus.call_later`, or the kit's ``rt.later``); ``clock``
    is the clock :meth:`at`'s times are on, so a service keeps its own (integers compare exactly:
    the same deadline asked again does not reschedule). Use it on the network thread, where what
    it schedules runs: it holds no lock."""

    __slots__ = ("_clock", "_due", "_entry", "_fn", "_later")

    def __init__(
        self,
        later: Callable[[float, Callable[[], None]], Later],
        fn: Callable[[], None],
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._later = later
        self._fn = fn
        self._clock = clock
        self._entry: Later | None = None
        self._due = 0

    @property
    def pending(self) -> bool:
        """A wake-up is set and has not run."""
        return self._entry is not None

    def soon(self, delay_s: float = 0.0) -> None:
        """Run ``fn`` ``delay_s`` from now (0: once the thread has done what it is doing), unless
        a wake-up is already set."""
        if self._entry is None:
            delay_s = max(0.0, delay_s)
            self._due = self._clock() + int(delay_s * 1e9)
            self._entry = self._later(delay_s, self._ring)

    def at(self, due: int) -> None:
        """Run ``fn`` at ``due`` (on ``clock``, in ns), unless a wake-up is set for no later."""
        if self._entry is not None:
            if self._due <= due:
                return
            self._entry.cancel()
        self._due = due
        self._entry = self._later(max(0.0, (due - self._clock()) / 1e9), self._ring)

    def cancel(self) -> None:
        """Drop the wake-up, if one is set."""
        if self._entry is not None:
            self._entry.cancel()
            self._entry = None

    def _ring(self) -> None:
        self._entry = None
        self._fn()


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def _never(_topic: bytes, _payload: bytes) -> bool:
    return False


def _filter_of(pattern: str) -> str:
    """The topic filter messages are matched against: a shared subscription's part after the group."""
    if pattern.startswith("$share/"):
        return pattern.split("/", 2)[2]
    return pattern


class Bus:
    """One MQTT connection with its own network thread. Handlers and timers run on that thread."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        durable: bool = False,
        manual_ack: bool = False,
        will: Will | None = None,
        receive_maximum: int = 1000,
        tick_s: float = 0.5,
        mqtt5: bool = True,
        max_pending: int = 10_000,
    ) -> None:
        """``durable`` keeps the session (subscriptions and unacknowledged messages) on the broker
        for ``settings.session_expiry_s`` while the client is away, so a restart resumes where it
        stopped. ``manual_ack`` delays the PUBACK of a received QoS 1 message until :meth:`ack`.

        ``mqtt5=False`` speaks MQTT 3.1.1: paho decodes MQTT 5 properties on every packet, ~10% of
        a one-reading-per-message hot path (docs/benchmarks.md). A 3.1.1 durable session lasts
        until the broker's ``persistent_client_expiration``, and the broker's
        ``max_inflight_messages`` takes the place of ``receive_maximum``.

        ``max_pending``: QoS 1 publishes waiting for the broker's acknowledgement beyond which the
        bus says it is :attr:`backlogged` (paho refuses a publish at 65,535).

        ``tick_s``: the longest the network thread sleeps with nothing due (paho's keepalive and
        retries are checked at least that often); timers and :meth:`call_later` wake it sooner."""
        if not client_id:
            raise ValueError("client_id must not be empty")
        self._settings = settings
        self.client_id = client_id
        self._durable = durable
        self._tick_s = tick_s
        self._subs: list[_Subscription] = []
        self._dispatchers: list[tuple[str, Callable[[paho.Client, Any, Message], None]]] = []
        self._timers: list[_Timer] = []
        self._laters: list[Later] = []
        self._later_seq = itertools.count()
        self._later_lock = threading.Lock()
        self._calls: deque[Callable[[], None]] = deque()
        self._on_connect_hooks: list[Callable[[bool], None]] = []
        self._after_reading: list[Callable[[], None]] = []
        self._publish_listeners: list[Callable[[int], None]] = []
        self._read_gate: Callable[[], bool] | None = None
        self._shed_topics: Collection[bytes] = frozenset()
        self._shed: Callable[[bytes, bytes], bool] = _never
        self._filter: FilteringSocket | None = None
        self._wake = threading.Event()
        self._pending: set[int] = set()
        self._pending_lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._refused: str | None = None
        """Why the broker refused these credentials (bad user name or password, not authorized):
        retrying cannot help, so :meth:`start` says so at once instead of waiting it out."""
        """Set when the broker has acknowledged every subscription made at the last connect."""
        self._suback_waiting: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connects = 0
        self._dropped_qos0 = 0
        self._handler_errors = 0
        self._receive_maximum = receive_maximum
        self._mqtt5 = mqtt5
        self._max_pending = max_pending
        self._overflow: deque[tuple[int, str, bytes, int, bool, Properties | None]] = deque()
        """QoS 1 publishes paho refused (its 65,535 message ids all wait for the broker), by ticket:
        handed to paho as the broker's acknowledgements free ids, in order."""
        self._tickets: dict[int, int] = {}
        """paho message id -> the ticket :meth:`publish` returned for an overflowed publish."""
        self._next_ticket = 1 << 20  # above every paho message id
        self._freed = 0
        self._drain_posted = False
        self._deferred = 0

        c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if mqtt5 else not durable,
            manual_ack=manual_ack,
            reconnect_on_failure=False,
        )
        c.max_inflight_messages_set(settings.max_inflight)
        c.max_queued_messages_set(0)
        if settings.username is not None:
            pw = settings.password.get_secret_value() if settings.password is not None else None
            c.username_pw_set(settings.username, pw)
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        # on_publish is set only while QoS 1 publishes wait for their PUBACK (see publish()): for
        # every QoS 0 publish paho would otherwise build a ReasonCode and a Properties object to
        # call it, which cost ingest ~20% of its one-reading-per-message throughput.
        self._publishing = 0
        c.on_socket_open = self._on_socket_open
        # With this callback set, paho queues every packet for the network thread's loop (woken
        # through its socketpair) instead of writing it from whichever thread called publish.
        c.on_socket_register_write = self._on_socket_register_write
        self._client = c

    # --- configuration (before start) ------------------------------------------------------------
    def subscribe(self, pattern: str, handler: Handler, *, qos: int = 1) -> None:
        """Register a handler; ``pattern`` may be a ``$share/{group}/...`` shared subscription."""
        self._subs.append(_Subscription(pattern, handler, qos))

        def dispatch(_c: paho.Client, _u: Any, msg: Message) -> None:
            try:
                handler(msg)
            except Exception:
                self._handler_errors += 1
                log.exception("message handler failed", extra={"client": self.client_id})

        # One subscription takes every message through paho's plain on_message: its per-topic
        # filter match (a walk of a trie per message) was 12% of ingest's network thread under
        # a flood (docs/benchmarks.md). With more, each is matched to its filter.
        self._dispatchers.append((_filter_of(pattern), dispatch))
        client = self._client
        if len(self._dispatchers) == 1:
            client.on_message = dispatch
        else:
            client.on_message = None
            for flt, fn in self._dispatchers:
                client.message_callback_add(flt, fn)
        if self._connected.is_set():
            self._client.subscribe(pattern, qos=qos)

    @property
    def subscriptions(self) -> int:
        """Subscriptions registered (a message may match more than one of them)."""
        return len(self._subs)

    def every(self, interval_s: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the network thread about every ``interval_s`` seconds."""
        self._timers.append(_Timer(interval_s, fn, time.monotonic() + interval_s))
        self._wake_thread()

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> Later:
        """Run ``fn`` once on the network thread ``delay_s`` seconds from now (0: after what the
        thread is doing). A service asks for a wake-up when it has something due (a partial batch,
        a retry, a commit) instead of polling for it with a fast timer. From any thread."""
        entry = Later(time.monotonic() + max(0.0, delay_s), next(self._later_seq), fn)
        with self._later_lock:
            heapq.heappush(self._laters, entry)
        if threading.current_thread() is not self._thread:
            self._wake_thread()
        return entry

    def cancel_later(self, entry: Later | None) -> None:
        """Drop a call :meth:`call_later` scheduled, if it has not run (None: nothing)."""
        if entry is not None:
            entry.cancel()

    def on_connect(self, hook: Callable[[bool], None]) -> None:
        """Call ``hook(session_present)`` on the network thread after each (re)connect."""
        self._on_connect_hooks.append(hook)

    def after_reading(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` on the network thread each time it has read what was waiting on the socket:
        a service that batches flushes there, so a batch grows with the load (a burst read at once)
        and nothing waits for a timer when the load is light."""
        self._after_reading.append(fn)

    def add_publish_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(mid)`` when the broker confirms a QoS 1 publish (on the network thread)."""
        self._publish_listeners.append(listener)

    def set_read_gate(self, gate: Callable[[], bool] | None) -> None:
        """While ``gate()`` is False the network thread reads no new packets (backpressure)."""
        self._read_gate = gate
        self._wake_thread()

    def set_shedder(self, topics: Collection[bytes], shed: Callable[[bytes, bytes], bool]) -> None:
        """Offer ``shed(topic, payload)`` every QoS 0 publish, neither retained nor empty, that
        arrives on one of ``topics`` (a container the caller keeps up to date), before paho reads
        it; True means the caller has dealt with it (counted it) and paho never sees it. Called on
        the network thread, from inside paho's reading (so before paho handles the packets that
        came before it in the same read: shedding must only count, never depend on their order)."""
        self._shed_topics = topics
        self._shed = shed
        if self._filter is not None:
            self._filter.set_shedder(topics, shed)

    # --- use -------------------------------------------------------------------------------------
    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> int:
        """Queue a publish and return its message id. QoS 1 publishes made while disconnected are
        kept and sent after reconnect; QoS 0 ones are counted in ``dropped_qos0`` and logged.
        ``properties`` (MQTT 5 only): e.g. a request's response topic and correlation data."""
        client = self._client
        if qos == 0:
            info = client.publish(topic, payload, qos=0, retain=retain, properties=properties)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._dropped_qos0 += 1
                if self._dropped_qos0 in (1, 10, 100, 1000) or self._dropped_qos0 % 10000 == 0:
                    log.warning(
                        "QoS 0 publish dropped", extra={"rc": int(info.rc), "dropped": self._dropped_qos0}
                    )
            return int(info.mid)
        with self._pending_lock:
            self._publishing += 1
            if client.on_publish is None:
                client.on_publish = self._on_publish
        try:
            if self._overflow:  # in order: behind what already waits
                return self._defer(topic, payload, qos, retain, properties)
            info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
            if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                # paho's message ids wrap at 65535: with that many publishes unacknowledged it
                # refuses the next one. It waits here instead (it used to raise, and a flood
                # turned 20,670 readings into silent `internal` refusals).
                return self._defer(topic, payload, qos, retain, properties)
            # The PUBACK may already have been handled (on another thread) by now.
            with internals.outgoing_locked(client):
                if internals.is_outgoing(client, info.mid):
                    with self._pending_lock:
                        self._pending.add(info.mid)
        finally:
            with self._pending_lock:
                self._publishing -= 1
        return int(info.mid)

    def _defer(
        self, topic: str, payload: bytes, qos: int, retain: bool, properties: Properties | None
    ) -> int:
        """Keep a QoS 1 publish paho refused until an acknowledgement frees a message id; its
        ticket stands for its message id (listeners are told of the ticket when it is confirmed)."""
        ticket = self._next_ticket
        self._next_ticket += 1
        self._overflow.append((ticket, topic, payload, qos, retain, properties))
        self._deferred += 1
        with self._pending_lock:
            self._pending.add(ticket)
            self._client.on_publish = self._on_publish
        if len(self._overflow) == 1:
            log.warning(
                "publish window full: publishes wait for the broker's acknowledgements",
                extra={"client": self.client_id, "pending": len(self._pending)},
            )
        return ticket

    def _drain_overflow(self) -> None:
        """On the network thread, after the acknowledgements that freed message ids were handled:
        hand paho as many waiting publishes as were freed."""
        self._drain_posted = False
        freed, self._freed = self._freed, 0
        client = self._client
        while self._overflow and freed > 0:
            ticket, topic, payload, qos, retain, properties = self._overflow[0]
            info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
            if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                return  # the next acknowledgement retries
            self._overflow.popleft()
            freed -= 1
            with self._pending_lock:
                self._tickets[int(info.mid)] = ticket

    def unsubscribe(self, pattern: str) -> None:
        """Unsubscribe now, if connected (an on_connect hook drops a subscription an older version
        left in a durable session)."""
        if self._connected.is_set():
            self._client.unsubscribe(pattern)

    @property
    def backlogged(self) -> bool:
        """``max_pending`` QoS 1 publishes, or as many packets, wait to go out: the broker is not
        keeping up with what this client publishes."""
        return (
            len(self._pending) >= self._max_pending
            or internals.queued_packets(self._client) >= self._max_pending
        )

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a received message (``manual_ack`` mode)."""
        if qos > 0:
            self._client.ack(mid, qos)

    def stats(self) -> dict[str, int]:
        """Connects so far, QoS 0 publishes dropped while disconnected, handlers that raised."""
        return {
            "connects": self._connects,
            "dropped_qos0": self._dropped_qos0,
            "handler_errors": self._handler_errors,
            "pending": len(self._pending),
            "deferred": self._deferred,
        }

    @property
    def pending(self) -> int:
        """QoS 1 publishes not yet acknowledged by the broker."""
        return len(self._pending)

    def is_pending(self, mid: int) -> bool:
        """Whether the QoS 1 publish ``mid`` still waits for the broker's acknowledgement."""
        with self._pending_lock:
            return mid in self._pending

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def refused(self) -> str | None:
        """Why the broker refused these credentials, if it did (no retry changes that)."""
        return None if self._connected.is_set() else self._refused

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self, *, wait_s: float | None = 10.0) -> None:
        """Start the network thread; with ``wait_s``, wait that long for the first connection and
        for the broker to acknowledge the subscriptions made before start, and raise BrokerError
        if they do not come (the thread keeps retrying otherwise). Once it returns, a message
        published by anyone reaches this bus's handlers: without the SUBACK, what another client
        publishes right after the CONNACK can reach the broker before the subscription does."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"bus-{self.client_id}", daemon=True)
        self._thread.start()
        if wait_s is None:
            return
        deadline = time.monotonic() + wait_s
        while self._refused is None and not self._connected.wait(
            min(0.05, max(0.0, deadline - time.monotonic()))
        ):
            if time.monotonic() >= deadline:
                break
        if self._refused is not None and not self._connected.is_set():
            self.stop(drain_s=0)
            where = f"{self._settings.host}:{self._settings.port}"
            raise BrokerError(f"the MQTT broker at {where} refused the connection: {self._refused}")
        if not self._connected.is_set() or not self._subscribed.wait(max(0.0, deadline - time.monotonic())):
            self.stop(drain_s=0)
            what = "connect to" if not self._connected.is_set() else "get its subscriptions acknowledged by"
            raise BrokerError(
                f"cannot {what} MQTT broker {self._settings.host}:{self._settings.port} within {wait_s}s"
            )

    def drain(self, timeout_s: float) -> bool:
        """Wait until every QoS 1 publish has been acknowledged and everything paho holds for the
        socket (the acknowledgements of what we received, too) is written, or the timeout passes:
        a stop right after a commit must not cut its acknowledgements (they came back once, under
        load, as redeliveries of what had been committed)."""
        deadline = time.monotonic() + timeout_s
        while (self.pending or internals.queued_packets(self._client)) and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.pending == 0 and not internals.queued_packets(self._client)

    def stop(self, *, drain_s: float = 5.0, final: list[tuple[str, bytes, bool]] | None = None) -> None:
        """Drain, publish ``final`` messages (topic, payload, retain) at QoS 1, disconnect, join."""
        if drain_s > 0 and self.connected:
            self.drain(drain_s)
        for topic, payload, retain in final or []:
            self.publish(topic, payload, qos=1, retain=retain)
        if final and self.connected:
            self.drain(min(2.0, max(drain_s, 0.5)))
        self._stop.set()
        self._wake_thread()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with contextlib.suppress(Exception):
            # the network thread is gone: let paho write what is queued and the DISCONNECT itself
            self._client.on_socket_register_write = None
            self._client.disconnect()

    def call(self, fn: Callable[[], None], *, timeout_s: float = 5.0) -> bool:
        """Run ``fn`` on the network thread and wait for it (for other threads that must touch
        state the handlers own). Runs it here when the network thread is not running."""
        if self._thread is None or not self._thread.is_alive():
            fn()
            return True
        done = threading.Event()

        def wrapped() -> None:
            try:
                fn()
            finally:
                done.set()

        self._calls.append(wrapped)
        self._wake_thread()
        return done.wait(timeout_s)

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the network thread soon, without waiting: a worker thread hands its
        results to the handlers' thread this way, so their state needs no locks. Wakes the
        thread's select() through paho's socketpair, as paho does for its own packets."""
        self._calls.append(fn)
        self._wake_thread()

    def _wake_thread(self) -> None:
        """Cut the network thread's wait short: its select() on the socket through paho's
        socketpair (as paho does for its own packets), its offline or gated wait through the event."""
        with contextlib.suppress(Exception):
            internals.wake(self._client)
        self._wake.set()

    def run_posted(self) -> None:
        """Run what other threads posted, now (call only on the network thread: a handler that
        must wait for a worker runs the worker's hand-backs meanwhile, or neither could go on)."""
        while self._calls:
            self._run_call(self._calls.popleft())

    # --- network thread --------------------------------------------------------------------------
    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self._durable:
            props.SessionExpiryInterval = self._settings.session_expiry_s
        props.ReceiveMaximum = self._receive_maximum
        return props

    def _run(self) -> None:
        delays = backoff_delays(self._settings.reconnect_min_s, self._settings.reconnect_max_s)
        first = True
        while not self._stop.is_set():
            try:
                if first:
                    if self._mqtt5:
                        rc = self._client.connect(
                            self._settings.host,
                            self._settings.port,
                            keepalive=self._settings.keepalive,
                            clean_start=not self._durable,
                            properties=self._connect_properties(),
                        )
                    else:
                        rc = self._client.connect(
                            self._settings.host, self._settings.port, keepalive=self._settings.keepalive
                        )
                else:
                    rc = self._client.reconnect()
                first = False
            except (OSError, ValueError) as exc:
                rc = MQTTErrorCode.MQTT_ERR_NO_CONN
                log.debug("connect failed", extra={"client": self.client_id, "error": str(exc)})
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._loop_until_disconnected()
                if self._connected.is_set() or self._connects:
                    delays = backoff_delays(self._settings.reconnect_min_s, self._settings.reconnect_max_s)
            self.run_posted()
            if self._stop.is_set():
                break
            self._wait_offline(next(delays))

    def _wait_offline(self, delay: float) -> None:
        """Wait ``delay`` before the next connect attempt, running what other threads post (a
        stop's calls) as it comes: a stop must not wait out a reconnect delay (up to
        ``reconnect_max_s``) per call, which after a long broker outage made a service miss its
        stop deadline and be killed."""
        deadline = time.monotonic() + delay
        while not self._stop.is_set():
            self.run_posted()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(left)  # a post() sets it
            self._wake.clear()

    def _loop_until_disconnected(self) -> None:
        client = self._client
        while not self._stop.is_set():
            tick = 0.0 if self._calls else self._wait_s()
            gate = self._read_gate
            if gate is None or gate():
                rc = client.loop(timeout=tick)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    rc = internals.read_waiting(client, gate=gate)
                    for fn in self._after_reading:
                        self._run_call(fn)
            else:
                rc = self._loop_without_reading(client, tick)
            if self._timers:
                self._run_timers()
            if self._laters:
                self._run_laters()
            if self._calls:
                self.run_posted()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._connected.clear()
                return

    def _loop_without_reading(self, client: paho.Client, tick: float) -> MQTTErrorCode:
        """One turn while the read gate is closed: write what is queued, keep the connection alive,
        and wait for a posted call (a worker finishing) rather than for the socket."""
        rc = client.loop_write()
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            rc = client.loop_misc()
        self._wake.wait(tick)
        self._wake.clear()
        return rc

    def _wait_s(self) -> float:
        """How long the thread may sleep: until the next timer or one-shot call is due, at most
        ``tick_s``."""
        due = time.monotonic() + self._tick_s
        for t in self._timers:
            due = min(due, t.due)
        laters = self._laters
        while laters and laters[0].cancelled:
            with self._later_lock:
                if laters and laters[0].cancelled:
                    heapq.heappop(laters)
        if laters:
            due = min(due, laters[0].due)
        return max(0.0, due - time.monotonic())

    def _run_laters(self) -> None:
        now = time.monotonic()
        laters = self._laters
        while laters and laters[0].due <= now:
            with self._later_lock:
                entry = heapq.heappop(laters)
            if not entry.cancelled:
                entry.cancelled = True  # ran: a cancel from now on is a no-op
                self._run_call(entry.fn)

    def _run_timers(self) -> None:
        now = time.monotonic()
        for t in list(self._timers):
            if now >= t.due:
                t.due = now + t.interval
                try:
                    t.fn()
                except Exception:
                    log.exception("timer failed", extra={"client": self.client_id})

    def _run_call(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("call failed", extra={"client": self.client_id})

    def _on_socket_open(self, client: paho.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._filter = FilteringSocket(sock, self._shed_topics, self._shed, mqtt5=self._mqtt5)
        internals.use_socket(client, self._filter)

    def _on_connect(self, client: paho.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("broker refused connection", extra={"client": self.client_id, "reason": str(reason)})
            if reason.value in _REFUSED_CREDENTIALS:
                self._refused = str(reason)
            return
        self._connects += 1
        self._subscribed.clear()
        self._suback_waiting = set()
        for sub in self._subs:
            _rc, mid = client.subscribe(sub.pattern, qos=sub.qos)
            if mid is not None:
                self._suback_waiting.add(mid)
        if not self._suback_waiting:
            self._subscribed.set()
        self._connected.set()
        log.info(
            "connected",
            extra={"client": self.client_id, "session_present": flags.session_present, "n": self._connects},
        )
        for hook in self._on_connect_hooks:
            try:
                hook(bool(flags.session_present))
            except Exception:
                log.exception("on_connect hook failed")

    def _on_subscribe(self, _c: paho.Client, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        refused = [str(r) for r in reasons or [] if getattr(r, "is_failure", False)]
        if refused:  # an ACL that denies the filter, say: the handler will never be called
            log.error("broker refused a subscription", extra={"client": self.client_id, "reasons": refused})
        self._suback_waiting.discard(mid)
        if not self._suback_waiting:
            self._subscribed.set()

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stop.is_set():
            log.warning("disconnected", extra={"client": self.client_id, "reason": str(reason)})

    def _on_socket_register_write(self, _c: paho.Client, _u: Any, _sock: Any) -> None:
        """Nothing to do: the network thread's loop selects for writing whenever paho has output."""

    def _on_publish(self, client: paho.Client, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        with self._pending_lock:
            ticket = self._tickets.pop(mid, mid) if self._tickets else mid
            self._pending.discard(ticket)
            # paho pops ``mid`` from _out_messages after this callback returns
            waiting = internals.outgoing_count(client) - internals.is_outgoing(client, mid)
            if not self._pending and not self._publishing and not waiting and not self._overflow:
                client.on_publish = None
        if self._overflow:
            self._freed += 1
            if not self._drain_posted:
                self._drain_posted = True
                self._calls.append(self._drain_overflow)
        for listener in self._publish_listeners:
            try:
                listener(ticket)
            except Exception:
                log.exception("publish listener failed", extra={"client": self.client_id})
