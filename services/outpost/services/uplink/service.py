"""The uplink service: what the cloud must get, taken from the local broker into the outbox on the
site's disk, and sent from there to the cloud side until it has committed it (docs/uplink.md).

Input (QoS 1, a durable session, ``Ack.AFTER_COMMIT``: a producer's message is acknowledged only
once the outbox's batched commit, ``synchronous=FULL``, holds it), by stream, most urgent first:

* ``alerts``: ``telemetry/alerts``;
* ``decisions``: ``decisions/+`` and ``escalations/+``;
* ``actions``: ``actions/+/results`` (the action audit records);
* ``memory``: memory sync's two streams, handed over on ``outbox/memory/+`` (:mod:`.relay`);
* ``metrics``: ``telemetry/rollups``;
* ``events``: ``events/+`` of the device classes ``uplink.events`` names (none by default).

Output: :class:`outpost.streams.OffsetStreams` (part ``uplink``) on ``up/uplink/{stream}``, while
the edge broker's bridge reports the link up, within the byte gate ``uplink.max_bytes_s``; the
cloud side (:mod:`.cloud`) answers on ``down/uplink/ack``. The outbox is kept within
``uplink.max_outbox_mb`` and ``uplink.max_age_s`` (:mod:`.outbox`), counted.

Without ``uplink.cloud`` the service takes nothing (a site with no cloud keeps nothing for one).
It only ever subscribes: nothing local waits for it or for the cloud.

The downlink (:class:`outpost.downlink.Downlink`: commands and desired state coming down the
bridge, docs/downlink.md) is mounted here too, its state beside the outbox: the uplink's session is
the durable one that a site with a cloud always runs.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any

import orjson

from outpost.bus import Alarm
from outpost.downlink import REASONS as DOWNLINK_REASONS
from outpost.downlink import Downlink
from outpost.log import get_logger
from outpost.service import SKIP, Ack, Inbound, Peek, Rejected, ServiceRuntime, run_until, service_main
from outpost.services.registry import OutpostSettings
from outpost.services.uplink.outbox import MESSAGE_BYTES, STREAMS, Outbox, StreamSource, Taken
from outpost.services.uplink.relay import PART as RELAYED
from outpost.services.uplink.relay import REASONS as RELAY_REASONS
from outpost.services.uplink.relay import Relay
from outpost.store import DiskFull, log_failed_commit
from outpost.streams import REASONS, ByteBucket, OffsetStreams
from outpost.topics import device_class

NAME = "uplink"
PART = "uplink"
log = get_logger("outpost.services.uplink")

COMMIT_AT = 1000
"""Records taken past which the outbox commits without waiting for ``uplink.commit_ms``."""

MAX_ID = 128

MIN_MESSAGE_BYTES = 4096
"""The smallest a message upstream is made under a tight cap (fewer, larger messages cost less)."""


def records_of(raw: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """The records of one message: a JSON object, or a non-empty list of them (a batch), each with
    a string ``id`` (how the cloud recognises a duplicate); each with its own bytes (the message's
    own for a single object). :class:`Rejected` (``not_json``, ``wrong_shape``) otherwise."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Rejected("not_json", str(exc)[:300]) from None
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise Rejected("wrong_shape", "an empty batch")
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise Rejected("wrong_shape", f"item {i} is a {type(it).__name__}, not an object")
        rid = it.get("id")
        if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID:
            raise Rejected("wrong_shape", f"item {i} has no string id of 1-{MAX_ID} characters")
    if isinstance(doc, dict):
        return [(doc, raw)]
    return [(it, orjson.dumps(it)) for it in items]


class Uplink:
    def __init__(self, settings: OutpostSettings) -> None:
        cfg = self.cfg = settings.uplink
        self.rt = ServiceRuntime(
            NAME, settings, reasons=REASONS + DOWNLINK_REASONS + RELAY_REASONS, durable=True
        )
        self.metrics = self.rt.metrics
        self._root = self.rt.topics.root + "/"
        self.pending: list[Taken] = []
        self._commit_due: Alarm = self.rt.alarm(self._commit)
        self._over_warned = False
        if not cfg.cloud:
            self.outbox: Outbox | None = None
            self.streams: OffsetStreams | None = None
            self.downlink: Downlink | None = None
            self.rt.extra_status = lambda: {"uplink_idle": "no uplink.cloud: nothing is kept for a cloud"}
            return
        cap = cfg.max_bytes_s
        # under a cap, a message is at most 1/20 s of it and the burst 1/4 s: the cap then holds over
        # short spans too (one message and the burst are what a span can exceed it by), and a
        # wake-up a little late loses none of it
        self.outbox = Outbox(
            self.rt.state_dir("uplink") / "outbox.db",
            message_bytes=min(MESSAGE_BYTES, max(cap // 20, MIN_MESSAGE_BYTES)) if cap else MESSAGE_BYTES,
        )
        gate = ByteBucket(cap, max(cap / 4, 1.0)) if cap else None
        self.budget = int(cfg.max_outbox_mb * 1_000_000)
        """The outbox's disk budget, bytes of records."""
        self.relay = Relay(self.rt, self.outbox, budget=self.budget, after=self._relayed)
        lost = {RELAYED: self.relay.forget}
        self.streams = OffsetStreams(
            self.rt,
            self.outbox.store,
            {s: StreamSource(self.outbox, s, lost.get(s)) for s in STREAMS},
            part=PART,
            window=cfg.window,
            batch=cfg.batch,
            resend_s=cfg.resend_s,
            link_topic=self.rt.topics.uplink_state(),
            counter_prefix="uplink",
            gate=gate,
        )
        self.downlink = Downlink(self.rt, self.rt.state_dir("uplink"))
        t = self.rt.topics
        self._take(t.telemetry_alerts, "alerts")
        self._take(t.all_decisions, "decisions")
        self._take(t.all_escalations, "decisions")
        self._take(t.all_action_results, "actions")
        self._take(t.telemetry_rollups, "metrics")
        if cfg.events:
            classes = frozenset(cfg.events)

            def wanted(device: str, _msg: Peek) -> str | None:
                return None if "*" in classes or device_class(device) in classes else SKIP

            self._take(t.all_events, "events", topic_key=t.event_device, screen=wanted)
        self.rt.after_reading(self._after_reading)
        self.rt.every(min(60.0, cfg.max_age_s / 4), lambda: self._expire(cfg.max_age_s))
        self.rt.extra_status = self._state

    def _take(self, pattern: str, stream: str, **kw: Any) -> None:
        def handle(inbound: Inbound[bytes]) -> None:
            topic = inbound.topic.removeprefix(self._root)
            now = time.time_ns()
            for _doc, body in records_of(inbound.raw):
                self.pending.append(Taken(stream, topic, body, now))

        self.rt.subscribe(
            pattern,
            handle,
            ack=Ack.AFTER_COMMIT,
            max_bytes=self.cfg.max_record_bytes,
            counter=f"taken_messages.{stream}",
            **kw,
        )

    # --- the outbox (network thread) -------------------------------------------------------------
    def _after_reading(self) -> None:
        """Once what waited on the socket is handled: what was taken is committed ``commit_ms``
        later, with what comes meanwhile (at once past ``COMMIT_AT`` records); nothing polls."""
        if len(self.pending) >= COMMIT_AT:
            self._commit()
        elif self.pending:
            self._commit_due.soon(self.cfg.commit_ms / 1000)
        elif not self._commit_due.pending:
            self.rt.committed()

    def _relayed(self) -> None:
        """Memory's records are in the outbox: keep the budget, send them."""
        assert self.streams is not None
        self._enforce()
        self.streams.pump_soon()

    def _commit(self) -> None:
        """Commit what was taken (one fsync), then acknowledge it to the local broker."""
        assert self.outbox is not None and self.streams is not None
        if self.pending:
            try:
                self.outbox.add(self.pending)
            except (sqlite3.Error, OSError, DiskFull) as exc:  # held, retried in a second
                log_failed_commit(log, "outbox", exc)
                self._commit_due.soon(1.0)
                return
            c = self.metrics.counters
            for t in self.pending:
                c[f"uplink_taken.{t.stream}"] += 1
            self.pending = []
            self._enforce()
            self.streams.pump()
        self.rt.committed()

    def _enforce(self) -> None:
        """The disk budget: the oldest bulk first, never alerts (counted, logged)."""
        assert self.outbox is not None
        if self.outbox.bytes <= self.budget:
            self._over_warned = False
            return
        dropped = self.outbox.enforce(self.budget)
        for stream, n in dropped.items():
            self.metrics.counters[f"uplink_dropped.{stream}"] += n
        if dropped:
            log.warning("outbox over its disk budget: oldest records dropped", extra={"dropped": dropped})
        if self.outbox.bytes > self.budget and not self._over_warned:
            self._over_warned = True
            log.warning(
                "outbox over its disk budget with only alerts and memory sync left: they are kept, and "
                "memory sync waits for room",
                extra={"bytes": self.outbox.bytes, "limit": self.budget},
            )

    def _expire(self, max_age_s: float) -> None:
        assert self.streams is not None
        self.streams.expire(max_age_s)

    def _state(self) -> dict[str, Any]:
        assert self.outbox is not None and self.streams is not None
        return {
            **self.streams.status(),
            "outbox_bytes": self.outbox.bytes,
            "outbox_records": self.outbox.count,
            "outbox_budget_bytes": self.budget,
            "outbox_over_budget": self.outbox.bytes > self.budget,
        }

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.rt.start()
        if self.outbox is None:
            log.info("no uplink.cloud: the uplink takes nothing")

    def stop(self) -> None:
        try:
            self.rt.stop(self._commit if self.outbox is not None else None)
        finally:
            if self.streams is not None:
                self.streams.close()
            if self.outbox is not None:
                self.outbox.close()
            if self.downlink is not None:
                self.downlink.close()


def run(settings: OutpostSettings, stop: threading.Event) -> Uplink:
    return run_until(Uplink(settings), stop)


def main() -> None:
    service_main(Uplink, OutpostSettings)
