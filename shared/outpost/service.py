"""The service kit: what every service stands on, so that a service's own file is its business
logic alone (docs/architecture.md, "Writing a service", has a complete small example).

A service declares its **subscriptions**: a topic pattern, the contract its messages must fit, a
handler, and an acknowledgement policy (:class:`Ack`). For every message the kit then:

1. parses the topic (``topic_key``: a TopicError is a ``bad_topic`` dead letter),
2. decodes the payload with the contract (a payload that does not fit is dead-lettered with one of
   :data:`outpost.contracts.DECODE_REASONS`; one bad item of a batch is refused alone),
3. calls the handler with an :class:`Inbound` holding the good items; a handler that raises
   :class:`Rejected` dead-letters the message with that reason, and any other exception is logged
   and dead-lettered as ``internal`` with the message's bytes (never lost, never a crash),
4. counts (``messages``, ``rejected``, ``rejected.{reason}``), and acknowledges the message when its
   policy says it is safe (:mod:`outpost.acks`): dead letters always hold it until the broker has
   confirmed them, so bad input always reaches the DLQ.

Overload is bounded here, once for every service (docs/architecture.md, "Overload"):

* a subscription's ``screen`` looks at a message before it is decoded and may **shed** it (ingest:
  a quarantined device); so does the kit itself for a QoS 0 message while the bus is backlogged
  (``overloaded``). Shed messages are counted as they come and dead-lettered in **aggregate**: one
  dead letter per (reason, source) per ``shed_interval_s`` (sooner when it holds QoS 1 messages),
  whose ``count`` says how many messages it stands for and whose payload is the first of them, so
  the DLQ never becomes a flood of its own;
* the bad items of one batch beyond ``dlq_items_per_message`` are **grouped**: one dead letter per
  reason, its ``count`` the number of items and ``items`` the first hundred indexes and reasons;
* every dead letter's ``count`` adds to its reason's counter, so counters and the DLQ agree:
  ``rejected.{reason}`` is the sum of ``count`` over that reason's dead letters.

Blocking work (HTTP, a database) goes to :meth:`ServiceRuntime.submit`, which runs it on the kit's
worker threads with a bounded queue that stops the bus reading while it is full (backpressure to
the broker; :mod:`outpost.worker`). Timers (:meth:`ServiceRuntime.every`), the state folder
(:meth:`ServiceRuntime.state_dir`), a retained status with a last will, periodic metrics and the
drain on SIGTERM (stop intake, the service's ``drain``, wait for what is held, status ``stopped``)
come from the kit too.

A service module provides a ``run(settings, stop)`` function that tests call directly, and a thin
``__main__`` that calls :func:`service_main`.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final, Generic, Protocol, TypeVar, cast

import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from outpost.acks import AckTracker, Turn
from outpost.bus import Alarm, Bus, Later, Message, Will
from outpost.contracts import (
    DECODE_REASONS,
    DLQ_PAYLOAD_MAX,
    Contract,
    Reject,
    dead_letter,
    header,
    item_bytes,
    now_ns,
)
from outpost.datadir import site_path
from outpost.disk import DiskWatch
from outpost.errors import OutpostError, TopicError
from outpost.log import get_logger
from outpost.metrics import Metrics, process_usage
from outpost.settings import CoreSettings, load_settings
from outpost.version import __version__
from outpost.worker import Worker

log = get_logger("outpost.service")

KIT_REASONS = (*DECODE_REASONS, "bad_topic", "internal", "overloaded")
"""The dead-letter reasons the kit itself gives; a service adds its own business reasons."""

T = TypeVar("T")

_SHAPE_REASONS = frozenset(
    ("too_large", "not_utf8", "not_json", "wrong_shape", "empty_batch", "batch_too_large")
)
"""Decode reasons about the message as a whole, kept when a subscription names schema violations
with an ``invalid_reason`` of its own."""

SKIP: Final = ""
"""What a subscription's ``screen`` returns for a message it has counted and that needs nothing
more (no handler, no dead letter): acknowledged as it is."""

_KEYS_CACHED: Final = 10_000
"""Topics whose key a subscription remembers (cleared when full: a flood of new topics costs
parsing, never memory)."""

GROUP_ITEMS_LISTED: Final = 100
"""Items a grouped dead letter lists by index and reason (its ``count`` says how many there were)."""


class Ack(enum.Enum):
    """When a received QoS 1 message is acknowledged (the broker redelivers it until then)."""

    AFTER_OUTPUTS = "after_outputs"
    """Once the handler has returned and every publish made for it (``for_=inbound.turn``), every
    dead letter and every piece of work it holds is confirmed: a service that turns each message
    into outputs (inference's scores, a reply)."""
    AFTER_COMMIT = "after_commit"
    """Once the service's next :meth:`ServiceRuntime.committed` (a flush, a database commit) has
    run and what that batch holds is confirmed: a service that batches many messages into one
    commit (ingest's flush, memory's log)."""
    AT_ONCE = "at_once"
    """When the handler returns (its dead letters confirmed): the handler's work is done and safe
    when it returns (a synchronous commit), or losing the message costs nothing."""


class Rejected(OutpostError):  # noqa: N818 - a control-flow outcome, not a failure
    """Raised by a handler to dead-letter its whole message with ``reason``."""

    def __init__(self, reason: str, detail: str, *, trace: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.trace = trace


@dataclass(slots=True, eq=False)
class Inbound(Generic[T]):
    """One received message, decoded."""

    topic: str
    raw: bytes
    key: str
    """What ``topic_key`` made of the topic (a device id, an operation); '' without one."""
    items: list[tuple[int, T]]
    """(index, item) of what fits the contract; [(0, raw)] for a subscription without one."""
    batch: bool
    turn: Turn
    msg: Message
    singles: int = 0
    """Items of this message dead-lettered one by one so far."""
    spill: dict[str, list[tuple[Reject, str | None]]] | None = None
    """Bad items past ``dlq_items_per_message``, by reason, grouped once the handler returns."""
    open: bool = True
    """Its handler has not returned yet (what it rejects may still be grouped)."""

    @property
    def dup(self) -> bool:
        """The broker says this is a redelivery."""
        return bool(self.msg.dup)


class Peek(Protocol):
    """What a screen looks at: a message paho has read, or one the bus has not handed to paho yet
    (:class:`Unread`)."""

    @property
    def topic(self) -> str: ...

    @property
    def payload(self) -> bytes | bytearray: ...

    @property
    def qos(self) -> int: ...

    @property
    def retain(self) -> bool: ...


@dataclass(slots=True)
class Unread:
    """A QoS 0 message, neither retained nor empty, that paho has not read (the kit screens it
    below paho: :meth:`ServiceRuntime._shed_unread`). Cheaper to make than paho's message, whose
    ``info`` holds a ``threading.Condition``."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


Handler = Callable[[Inbound[Any]], None]
Screen = Callable[[str, Peek], "str | None"]
"""``screen(key, msg)``: None to go on (decode, handler), a reason to shed the message (counted,
dead-lettered in aggregate), :data:`SKIP` for a message the screen has dealt with itself; it may
also raise :class:`Rejected` to dead-letter the message at once."""


@dataclass(slots=True)
class Subscription:
    pattern: str
    handler: Handler
    contract: Contract[Any] | None
    ack: Ack
    qos: int
    topic_key: Callable[[str], str | None] | None
    max_bytes: int
    max_items: int
    lenient: bool
    invalid_reason: str | None
    counter: str
    lane: str
    screen: Screen | None
    charge: Callable[[str, int], None] | None
    keys: dict[str, str] = field(default_factory=dict)
    """topic -> what ``topic_key`` made of it: parsing a topic cost ~1 us a message."""


@dataclass(slots=True)
class _Pile:
    """Messages shed from one source for one reason since the last aggregate dead letter."""

    topic: str
    first: bytes
    detail: str
    count: int = 0
    nbytes: int = 0
    turns: list[Turn] | None = None
    """Turns of shed QoS 1 messages: held until the aggregate dead letter is confirmed."""


class ServiceRuntime:
    """The kit of one service process: its bus, subscriptions, acknowledgements, worker, timers,
    status, metrics and dead letters."""

    def __init__(
        self,
        name: str,
        settings: CoreSettings,
        *,
        reasons: Sequence[str] = (),
        durable: bool = False,
        receive_maximum: int = 1000,
        tick_s: float = 0.5,
        mqtt5: bool = True,
        worker_threads: int = 1,
        worker_bound: int = 64,
        dlq_qos: int = 1,
        max_pending: int = 10_000,
        shed_interval_s: float = 1.0,
        dlq_items_per_message: int = 10,
    ) -> None:
        """``reasons``: the service's own dead-letter reasons, beside :data:`KIT_REASONS`.
        ``durable`` keeps the broker session (subscriptions and unacknowledged messages) across a
        restart. ``tick_s``: the longest the network thread sleeps with nothing due (timers and
        :meth:`later` wake it when they are due). ``mqtt5=False`` speaks MQTT 3.1.1 (cheaper to
        decode on a hot path; no response topics). ``dlq_qos`` 0 trades the dead letters' delivery
        guarantee for speed (they then hold nothing). ``max_pending``: QoS 1 publishes waiting for
        the broker past which QoS 0 input is shed as ``overloaded`` (:attr:`Bus.backlogged`).
        ``shed_interval_s``: how often shed messages are dead-lettered in aggregate.
        ``dlq_items_per_message``: bad items of one batch dead-lettered one by one before the rest
        are grouped by reason."""
        self.name = name
        self.settings = settings
        self.topics = settings.topics
        self.metrics = Metrics(name)
        self.reasons = frozenset((*KIT_REASONS, *reasons))
        self.dlq_qos = dlq_qos
        self.dlq_items_per_message = dlq_items_per_message
        self._piles: dict[tuple[str, str], _Pile] = {}
        self._piles_held = False
        self._shed_topics: dict[bytes, tuple[Subscription, str, str]] = {}
        """Topics whose last QoS 0 message was shed -> (subscription, key, topic): the bus offers
        their next QoS 0 messages to :meth:`_shed_unread` before paho reads them."""
        self.shed_details: dict[str, str] = {
            "overloaded": "the broker was not taking this service's output, so QoS 0 input gave way"
        }
        """Why a message shed for a reason was shed, for its aggregate dead letter."""
        self.started_ns = now_ns()
        self.status_topic = self.topics.service_status(name)
        self.dlq_topic = self.topics.dlq(name)
        client_id = f"{settings.prefix}-{settings.site}-{name}"
        self.bus = Bus(
            settings.mqtt,
            client_id=client_id,
            durable=durable,
            manual_ack=True,
            will=Will(self.status_topic, self._status("offline", clean=False)),
            receive_maximum=receive_maximum,
            tick_s=tick_s,
            mqtt5=mqtt5,
            max_pending=max_pending,
        )
        self.acks = AckTracker(self.bus.ack)
        self.bus.add_publish_listener(self.acks.published)
        self.worker = Worker(name, self.bus.post, threads=worker_threads, bound=worker_bound)
        self.bus.set_read_gate(lambda: self.worker.has_room)
        self.extra_status: Callable[[], dict[str, Any]] | None = None
        self._problems: tuple[str, ...] = ()
        self._draining = False
        self._stopped = False
        """Set once drained: the service's timers and hooks no longer run."""
        self.bus.on_connect(self._announce)
        self.bus.every(settings.telemetry.metrics_interval_s, self.publish_metrics)
        # a full disk, a low one, a folder over its budget: problems in the status (outpost.disk)
        self.disk = DiskWatch(Path(settings.data_dir), settings.disk, self.metrics, self._disk_changed)
        self.bus.every(0.5, self.disk.poll)
        self.bus.every(settings.disk.check_s, self.disk.measure)
        self.bus.every(shed_interval_s, self._publish_piles)
        self.bus.after_reading(self._publish_held_piles)
        self.bus.set_shedder(self._shed_topics, self._shed_unread)

    # --- declaring -------------------------------------------------------------------------------
    def subscribe(
        self,
        pattern: str,
        handler: Callable[[Inbound[T]], None],
        *,
        contract: Contract[T] | None = None,
        ack: Ack = Ack.AFTER_OUTPUTS,
        qos: int = 1,
        topic_key: Callable[[str], str | None] | None = None,
        max_bytes: int = 4_000_000,
        max_items: int = 10_000,
        lenient: bool = False,
        invalid_reason: str | None = None,
        counter: str = "messages",
        lane: str = "",
        screen: Screen | None = None,
        charge: Callable[[str, int], None] | None = None,
    ) -> None:
        """Deliver messages on ``pattern`` (a ``$share/{group}/...`` filter too) to ``handler``.

        ``contract`` decodes the payload (without one the handler gets the raw bytes as its only
        item). ``invalid_reason`` names every schema violation with one reason of the service's
        (inference says ``bad_event``) instead of the precise one; ``lenient`` reads NaN and
        Infinity so they are refused as ``not_finite``. ``counter`` counts the subscription's
        messages (``messages`` counts every message of the service). ``lane`` names an
        acknowledgement order of the subscription's own (:mod:`outpost.acks`), for messages
        independent of the rest whose work may take long (memory's requests).
        ``topic_key`` may return None for a topic the pattern matches that is not the service's
        (counted ``ignored``). ``screen`` (:data:`Screen`) sees each message before it is decoded;
        ``charge(key, n)`` is told of the ``n`` items of a message the decoder refused (a rate
        limit that counts bad input too)."""
        if lane and ack is Ack.AFTER_COMMIT:
            raise ValueError("the open batch of AFTER_COMMIT messages is in the default lane")
        sub = Subscription(
            pattern,
            handler,
            contract,
            ack,
            qos,
            topic_key,
            max_bytes,
            max_items,
            lenient,
            invalid_reason,
            counter,
            lane,
            screen,
            charge,
        )
        self._shed_topics.clear()  # with two subscriptions a message may be for both: see _handle
        self.bus.subscribe(pattern, lambda msg: self._deliver(sub, msg), qos=qos)

    def every(self, interval_s: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the network thread about every ``interval_s`` seconds, until the stop has
        drained the service (a timer must not start work once the worker has finished)."""
        self.bus.every(interval_s, self._until_stopped(fn))

    def later(self, delay_s: float, fn: Callable[[], None]) -> Later:
        """Run ``fn`` once on the network thread ``delay_s`` seconds from now, unless the stop has
        drained the service first (:meth:`Bus.call_later`): a service asks to be woken when
        something of its own falls due (a partial batch, a retry, a commit) rather than poll."""
        return self.bus.call_later(delay_s, self._until_stopped(fn))

    def alarm(self, fn: Callable[[], None], clock: Callable[[], int] = time.monotonic_ns) -> Alarm:
        """One pending wake-up for ``fn`` on the network thread (:class:`outpost.bus.Alarm`, run
        through :meth:`later`): what a service holds for its commit, partial batch or retry."""
        return Alarm(self.later, fn, clock)

    def after_reading(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the network thread each time the messages waiting on the socket have been
        read and handled (``Bus.after_reading``): where a batching service flushes."""
        self.bus.after_reading(self._until_stopped(fn))

    def _until_stopped(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            if not self._stopped:
                fn()

        return run

    def state_dir(self, *parts: str) -> Path:
        """The service's folder under its site's (created), for its SQLite state: two sites in one
        data folder never share state (:mod:`outpost.datadir`)."""
        path = site_path(self.settings.data_dir, self.settings.site, *parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # --- the path of one message -----------------------------------------------------------------
    def _count(self, sub: Subscription) -> None:
        """``messages`` counts every message the service receives (``outpost status`` shows it);
        a subscription's own counter, where it has one, counts its part of them too."""
        c = self.metrics.counters
        c["messages"] += 1
        if sub.counter != "messages":
            c[sub.counter] += 1

    def _deliver(self, sub: Subscription, msg: Message) -> None:
        c = self.metrics.counters
        if self._draining:
            # left unacknowledged: the broker redelivers it when the service is back
            c["left_for_redelivery"] += 1
            return
        self._count(sub)
        qos = msg.qos
        turn = (
            self.acks.batched(msg.mid, qos)
            if sub.ack is Ack.AFTER_COMMIT
            else self.acks.single(msg.mid, qos, sub.lane)
        )
        raw = cast(bytes, msg.payload)  # paho types it bytes | bytearray; a received one is bytes
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self.dead_letter("bad_topic", "topic is not valid UTF-8", "<non-utf8>", bytes(raw), for_=turn)
            self._handled(sub, turn)
            return
        try:
            self._handle(sub, msg, topic, raw, turn)
        except Rejected as exc:
            self.dead_letter(exc.reason, exc.detail, topic, bytes(raw), trace=exc.trace, for_=turn)
        except TopicError as exc:
            self.dead_letter("bad_topic", str(exc), topic, bytes(raw), for_=turn)
        except Exception as exc:
            # A bug must not lose the message silently: it goes to the DLQ with its bytes, for a
            # person to look at and replay, and the service goes on. The log line is rate-limited
            # per kind (outpost.log.RepeatFilter); the dead letters and the counter are not.
            log.exception("handler failed on a message", extra={"service": self.name, "topic": topic[:200]})
            self.dead_letter("internal", f"{type(exc).__name__}: {exc}", topic, bytes(raw), for_=turn)
        self._handled(sub, turn)

    def _handle(self, sub: Subscription, msg: Message, topic: str, raw: bytes, turn: Turn) -> None:
        key = ""
        if sub.topic_key is not None:
            cached = sub.keys.get(topic)
            if cached is not None:
                key = cached
            else:
                got = sub.topic_key(topic)  # a TopicError is a bad_topic dead letter (not cached)
                if got is None:  # matched by the pattern, not the service's (a device's status)
                    self.metrics.counters["ignored"] += 1
                    return
                if len(sub.keys) >= _KEYS_CACHED:
                    sub.keys.clear()
                sub.keys[topic] = key = got
        shed = self._screen(sub, key, msg)
        if shed is not None:
            if shed:
                self._shed(shed, key, topic, raw, turn if msg.qos else None)
                if msg.qos == 0 and not msg.retain and self.bus.subscriptions == 1:
                    # the next QoS 0 messages on this topic are screened before paho reads them
                    if len(self._shed_topics) >= _KEYS_CACHED:
                        self._shed_topics.clear()
                    self._shed_topics[topic.encode()] = (sub, key, topic)
            return
        contract = sub.contract
        if contract is None:
            if len(raw) > sub.max_bytes:
                raise Rejected("too_large", f"{len(raw)} bytes > limit {sub.max_bytes}")
            sub.handler(Inbound(topic, raw, key, [(0, raw)], False, turn, msg))
            return
        decoded = contract.decode(raw, max_bytes=sub.max_bytes, max_items=sub.max_items, lenient=sub.lenient)
        inbound = Inbound(topic, raw, key, decoded.items, decoded.batch, turn, msg)
        for rej in decoded.rejects:
            if sub.invalid_reason is not None and rej.reason not in _SHAPE_REASONS:
                rej.reason = sub.invalid_reason
            self.reject(inbound, rej)
        if decoded.rejects and sub.charge is not None:
            sub.charge(key, len(decoded.rejects))
        if decoded.items:
            sub.handler(inbound)
        inbound.open = False
        if inbound.spill:
            self._publish_groups(inbound, inbound.spill)

    def _screen(self, sub: Subscription, key: str, msg: Peek) -> str | None:
        """The subscription's screen, then the kit's own: QoS 0 input gives way while the broker
        is not taking this service's output."""
        shed = sub.screen(key, msg) if sub.screen is not None else None
        if shed is None and msg.qos == 0 and self.bus.backlogged:
            shed = "overloaded"
        return shed

    # --- shedding and grouping -------------------------------------------------------------------
    def _shed_unread(self, topic_b: bytes, payload: bytes) -> bool:
        """A QoS 0 message (neither retained nor empty) on a topic whose last message was shed,
        before paho has read it (:meth:`Bus.set_shedder`): screened as :meth:`_handle` would,
        and shed here when the screen still says so (counted, into the same piles); otherwise
        the topic is forgotten and paho reads the message as any other. A flood of QoS 0 messages
        from a quarantined device then costs ~2 us a message instead of paho's ~12
        (docs/benchmarks.md, "Overload (issue 14)"). Only while the bus has one subscription: a
        message matching two would be lost to the other.

        The screen sees the message it lets through twice (here, and once paho has read it): once
        each time a topic stops being shed. Ingest's message count then counts that one message
        twice, which only brings a flooding device's next quarantine one message nearer."""
        mark = self._shed_topics.get(topic_b)
        if mark is None or self._draining or self.bus.subscriptions != 1:
            return False
        sub, key, topic = mark
        try:
            shed = self._screen(sub, key, Unread(topic, payload))
        except Exception:  # noqa: BLE001 - Rejected and the like: paho reads it, _deliver deals with it
            shed = None
        if not shed:
            del self._shed_topics[topic_b]
            return False
        self._count(sub)
        self.metrics.counters["shed_unread"] += 1
        self._shed(shed, key, topic, payload, None)
        return True

    def _shed(self, reason: str, key: str, topic: str, raw: bytes, turn: Turn | None) -> None:
        """Count a shed message now; its dead letter is the aggregate of its pile."""
        c = self.metrics.counters
        c["rejected"] += 1
        c["rejected." + reason] += 1
        c["shed"] += 1
        pile = self._piles.get((reason, key))
        if pile is None:
            detail = self.shed_details.get(reason, reason)
            pile = self._piles[(reason, key)] = _Pile(topic, bytes(raw), detail)
        pile.count += 1
        pile.nbytes += len(raw)
        if turn is not None:
            self.acks.hold(turn)
            if pile.turns is None:
                pile.turns = [turn]
            elif pile.turns[-1] is not turn:
                pile.turns.append(turn)
            self._piles_held = True

    def _publish_held_piles(self) -> None:
        """After each read: piles that hold QoS 1 messages go out now, so they never hold up the
        acknowledgement of what arrived after them (turns are acknowledged in order)."""
        if self._piles_held:
            self._publish_piles()

    def _publish_piles(self) -> None:
        piles, self._piles = self._piles, {}
        self._piles_held = False
        for (reason, key), pile in piles.items():
            source = f" from {key}" if key else ""
            detail = f"{pile.count} message(s), {pile.nbytes} bytes{source}, shed: {pile.detail}"
            turns = pile.turns or ()
            self._emit(
                reason, detail, pile.topic, pile.first, count=pile.count, for_=turns or None, counted=True
            )
            for t in turns:
                self.acks.release(t)

    def _publish_groups(
        self, inbound: Inbound[Any], spill: dict[str, list[tuple[Reject, str | None]]]
    ) -> None:
        """One dead letter per reason for the bad items past ``dlq_items_per_message``: ``count``
        items, the first hundred listed, as many of them as fit 64 KiB in its payload (a JSON list)."""
        for reason, rejects in spill.items():
            parts: list[bytes] = []
            size = 2
            for rej, _trace in rejects:
                b = item_bytes(rej.item, b"null")
                if size + len(b) + 1 > DLQ_PAYLOAD_MAX:
                    break
                parts.append(b)
                size += len(b) + 1
            first, trace = rejects[0]
            n = len(rejects)
            self._emit(
                reason,
                f"{n} more items refused as {reason} (items lists the first {GROUP_ITEMS_LISTED}); "
                f"first: {first.detail}",
                inbound.topic,
                b"[" + b",".join(parts) + b"]",
                trace=trace,
                index=first.index,
                count=n,
                items=[{"index": r.index, "detail": r.detail[:200]} for r, _ in rejects[:GROUP_ITEMS_LISTED]],
                truncated=len(parts) < n,
                for_=inbound.turn,
            )

    def _handled(self, sub: Subscription, turn: Turn) -> None:
        if sub.ack is not Ack.AFTER_COMMIT:
            self.acks.seal(turn)

    # --- what a handler does ---------------------------------------------------------------------
    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        for_: Turn | Iterable[Turn] | None = None,
        properties: Properties | None = None,
    ) -> int:
        """Publish; with ``for_`` (and QoS 1) the turns wait for the broker's confirmation."""
        mid = self.bus.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if for_ is not None and qos:
            self.acks.track(mid, for_)
        return mid

    def reply(self, inbound: Inbound[Any], payload: bytes) -> bool:
        """Answer an MQTT 5 request on its response topic with its correlation data (the reply
        holds the request's turn); False when the request named no response topic."""
        props = getattr(inbound.msg, "properties", None)
        reply_to = getattr(props, "ResponseTopic", None)
        if not reply_to:
            return False
        out = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        corr = getattr(props, "CorrelationData", None)
        if corr is not None:
            out.CorrelationData = corr
        self.publish(str(reply_to), payload, for_=inbound.turn, properties=out)
        return True

    def dead_letter(
        self,
        reason: str,
        detail: str,
        topic: str,
        payload: bytes,
        *,
        trace: str | None = None,
        index: int | None = None,
        for_: Turn | Iterable[Turn] | None = None,
    ) -> int:
        """Count a rejection (``rejected`` and ``rejected.{reason}``) and publish its dead letter on
        ``.../dlq/{service}``; ``for_`` turns wait for the broker's confirmation."""
        return self._emit(reason, detail, topic, payload, trace=trace, index=index, for_=for_)

    def _emit(
        self,
        reason: str,
        detail: str,
        topic: str,
        payload: bytes,
        *,
        trace: str | None = None,
        index: int | None = None,
        count: int = 1,
        items: list[dict[str, Any]] | None = None,
        truncated: bool = False,
        for_: Turn | Iterable[Turn] | None = None,
        counted: bool = False,
    ) -> int:
        """Publish one dead letter standing for ``count`` inputs; counted here unless ``counted``
        (shed messages are counted as they come). Every dead letter goes out once: its id is made
        here and a resend after a reconnect carries the same bytes."""
        if reason not in self.reasons:
            log.error("dead letter with an undeclared reason", extra={"service": self.name, "reason": reason})
        if not counted:
            c = self.metrics.counters
            c["rejected"] += count
            c["rejected." + reason] += count
        entry = dead_letter(
            stage=self.name,
            reason=reason,
            detail=detail,
            topic=topic,
            payload=payload,
            trace=trace,
            index=index,
            count=count,
            items=items,
            truncated=truncated,
        )
        return self.publish(self.dlq_topic, entry, qos=self.dlq_qos, for_=for_)

    def reject(self, inbound: Inbound[Any], rej: Reject, *, trace: str | None = None) -> None:
        """Dead-letter one item of a message (its own bytes when it came in a batch) or all of it.
        Past ``dlq_items_per_message`` items of one batch, the rest are grouped by reason into one
        dead letter each once the handler has returned."""
        one = inbound.batch and rej.item is not None
        if one and inbound.open:
            inbound.singles += 1
            if inbound.singles > self.dlq_items_per_message:
                if inbound.spill is None:
                    inbound.spill = {}
                inbound.spill.setdefault(rej.reason, []).append((rej, trace))
                return
        self.dead_letter(
            rej.reason,
            rej.detail,
            inbound.topic,
            item_bytes(rej.item, inbound.raw) if one else inbound.raw,
            trace=trace,
            index=rej.index if inbound.batch else None,
            for_=inbound.turn,
        )

    def hold(self, turn: Turn) -> None:
        """Keep ``turn`` unacknowledged until :meth:`release` (work in progress for it)."""
        self.acks.hold(turn)

    def release(self, turn: Turn) -> None:
        self.acks.release(turn)

    @property
    def batch(self) -> Turn | None:
        """The open turn of ``AFTER_COMMIT`` messages (None when none arrived since the last
        commit): what a batching service's commit publishes is made ``for_`` it."""
        return self.acks.open_batch

    def committed(self, on_done: Callable[[], None] | None = None) -> None:
        """The service's commit (or flush) has made what ``AFTER_COMMIT`` messages caused safe: they
        are acknowledged once what they hold is confirmed; ``on_done`` runs then. Nothing happens
        when no such message waits, so a service may call it on every timer tick: that is also how
        messages that caused nothing to commit (all dead-lettered) are acknowledged."""
        self.acks.seal_batch(on_done)

    def submit(
        self,
        fn: Callable[[], T],
        done: Callable[[T | BaseException], None],
        *,
        for_: Turn | None = None,
    ) -> None:
        """Run blocking ``fn`` on the kit's worker; ``done(result or exception)`` runs on the
        network thread after it, then ``for_`` is released."""
        if for_ is None:
            self.worker.submit(fn, done)
            return
        turn = for_
        self.acks.hold(turn)

        def finish(result: T | BaseException) -> None:
            try:
                done(result)
            finally:
                self.acks.release(turn)

        self.worker.submit(fn, finish)

    # --- status and metrics ----------------------------------------------------------------------
    def _status(self, state: str, *, clean: bool = True) -> bytes:
        body = header()
        body.update(
            service=self.name,
            state=state,
            version=__version__,
            config_hash=self.settings.config_hash(),
            pid=os.getpid(),
            started_ns=self.started_ns,
        )
        if not clean:
            body["reason"] = "connection lost"
        elif state == "online":
            problems = [*self._problems, *self.disk.problems]
            body["health"] = "degraded" if problems else "ok"
            body["problems"] = problems
        return orjson.dumps(body)

    def set_problems(self, problems: Sequence[str]) -> None:
        """What keeps the service from doing all of its job while it runs on (a model that cannot
        load, a missing text encoder): the retained status says ``health: degraded`` with them,
        or ``ok``, republished when they change. Any thread may call it."""
        new = tuple(p[:300] for p in problems[:10])
        if new == self._problems:
            return
        self._problems = new
        if new:
            log.warning("degraded", extra={"service": self.name, "problems": list(new)})
        if self.bus.connected:
            self._announce()

    def _disk_changed(self) -> None:
        if self.disk.problems:
            log.warning("disk", extra={"service": self.name, "problems": self.disk.problems})
        if self.bus.connected:
            self._announce()

    def _announce(self, _session_present: bool = False) -> None:
        self.bus.publish(self.status_topic, self._status("online"), qos=1, retain=True)

    def publish_metrics(self) -> None:
        snap = self.metrics.snapshot()
        snap.update(header())
        snap["started"] = self.started_ns
        snap["sketches"] = self.metrics.take_sketches()
        counters = snap["counters"]
        bus = self.bus.stats()
        counters["bus_connects"] = bus["connects"]
        counters["bus_dropped_qos0"] = bus["dropped_qos0"]
        counters["bus_handler_errors"] = bus["handler_errors"]
        counters["bus_publishes_deferred"] = bus["deferred"]
        counters["acknowledged"] = self.acks.acknowledged
        counters["worker_jobs"] = self.worker.completed
        counters["worker_busy_ms"] = self.worker.busy_ns // 1_000_000
        state: dict[str, Any] = {
            **self.acks.stats(),
            "worker_queued": self.worker.queued,
            **self.disk.state(),
            **process_usage(),
        }
        if self.extra_status is not None:
            state.update(self.extra_status())
        snap["state"] = state
        self.bus.publish(self.topics.metrics(self.name), orjson.dumps(snap), qos=0)

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self, wait_s: float | None = 30.0) -> None:
        """Connect; ``wait_s`` None: return at once and keep trying in the background."""
        self.disk.measure()
        self.bus.start(wait_s=wait_s)

    def stop(self, drain: Callable[[], None] | None = None, *, drain_s: float = 10.0) -> None:
        """Stop intake (what arrives from now on is left for redelivery), run ``drain`` on the
        network thread (flush, score, commit what waits), wait up to ``drain_s`` for what is held
        to be confirmed and acknowledged, finish the worker's jobs, then go offline. With the
        broker gone it waits for nothing the broker would have to confirm: what is unacknowledged
        stays on the broker for redelivery, and the stop is prompt (a supervisor kills a service
        that takes too long)."""
        self.bus.call(self._stop_intake, timeout_s=5)
        if drain is not None:
            self.bus.call(drain, timeout_s=drain_s)
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and (
            self.worker.queued or (self.acks.waiting and self.bus.connected)
        ):
            time.sleep(0.01)
        # no timer may hand the worker a job from here on (one that did after the worker stopped
        # ran beside the service's own last commit and close: a crash in SQLite)
        self.bus.call(self._stop_timers, timeout_s=5)
        self.worker.stop()
        if self.bus.connected:  # offline, there is no one to tell (and no QoS 0 publish to drop)
            self.publish_metrics()
        self.bus.stop(drain_s=5.0, final=[(self.status_topic, self._status("stopped"), True)])

    def _stop_intake(self) -> None:
        self._draining = True
        self._publish_piles()  # what was shed so far, counted, goes out with the drain

    def _stop_timers(self) -> None:
        self._stopped = True


def install_stop_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` (only possible from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("stop requested", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def wait(stop: threading.Event, poll_s: float = 5.0) -> None:
    """Block until ``stop`` is set, without polling it (a 0.2 s poll was 5 of a service's ~13
    wake-ups a second at idle).

    Off the main thread no signal handler runs, so ``stop.wait()`` is safe. On the main thread the
    SIGTERM handler sets ``stop`` on this very thread, and ``Event.wait`` holds the event's lock at
    moments: a signal landing then made ``set()`` wait for that lock for ever (a memory service
    outlived a kill -9 of ``outpost up`` this way). So the main thread waits in ``select`` on a
    pipe that the interpreter writes to when a signal arrives (``signal.set_wakeup_fd``): the
    handler runs, the pipe is readable, ``stop`` is looked at. ``poll_s`` bounds the wait, in case
    another thread sets ``stop``."""
    if threading.current_thread() is not threading.main_thread():
        stop.wait()
        return
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    old = signal.set_wakeup_fd(w)
    try:
        while not stop.is_set():
            select.select([r], [], [], poll_s)
            with contextlib.suppress(BlockingIOError):
                os.read(r, 512)
    finally:
        signal.set_wakeup_fd(old)
        os.close(r)
        os.close(w)


class Runnable(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


S = TypeVar("S", bound=Runnable)
SettingsT = TypeVar("SettingsT", bound=CoreSettings)


def run_until(svc: S, stop: threading.Event) -> S:
    """Start ``svc``, wait for ``stop``, stop it (drain, flush, checkpoint) and return it: every
    service's ``run(settings, stop)``, which tests call in-process."""
    svc.start()
    wait(stop)
    svc.stop()
    return svc


def service_main(make: Callable[[SettingsT], Runnable], settings_cls: type[SettingsT]) -> None:
    """Every service's ``__main__``: settings (of ``settings_cls``) from the environment and the
    site file, logging, SIGTERM/SIGINT for a clean stop, then run until stopped."""
    from outpost.log import setup_logging

    try:
        settings = load_settings(settings_cls)
        setup_logging(settings.log_level, json=settings.log_json)
        stop = threading.Event()
        install_stop_signals(stop)
        service = make(settings)
        # What the process built to start (modules, models, settings: hundreds of thousands of
        # objects) is frozen out of the garbage collector: a full collection walking them all
        # stopped the network thread for 50-80 ms, a 10 s window's p99 on its own
        # (docs/benchmarks.md). Only here, in a service's own process: frozen objects are never
        # freed, which a process that runs many services in turn (the tests) cannot afford.
        gc.collect()
        gc.freeze()
        run_until(service, stop)
    except OutpostError as exc:  # a bad setting, a broker that never answered, unusable state
        # stderr first, one line: the log may be a file on the very disk that is full
        print(f"error: {exc}", file=sys.stderr, flush=True)
        log.error("cannot run", extra={"error": str(exc)})
        sys.exit(2)
    except Exception as exc:  # a bug, or the OS refusing (a full disk under a file we open)
        print(f"error: cannot run: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        log.exception("cannot run")
        sys.exit(1)
