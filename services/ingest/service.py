"""The ingest service: ``.../dev/{device}/telemetry`` in, ``.../events/{device}`` and ``.../dlq/ingest`` out.

Delivery: at-least-once on the wire, exactly-once in effect.

* It subscribes at QoS 1 with a durable session and acknowledges a telemetry message only after the
  broker has confirmed every event and dead letter it produced (``manual_ack``). A kill -9 at any
  point leaves unacknowledged messages on the broker, which redelivers them on restart.
* An event's id is derived from (site, device, seq), so a reading re-emitted after a crash carries
  the id it had the first time; consumers drop the copy by id.
* Which seqs were seen is committed to SQLite, in batches, only once their events are confirmed.

Work is done in *cycles*: messages are processed as they arrive, their events are batched per device
and published when ``flush_ms`` passes or ``flush_max`` events wait. A cycle completes when all its
publishes are confirmed; then its inputs are acknowledged and its seq state is queued for commit.
Everything runs on the bus's network thread, so there are no locks.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from outpost.bus import Message, topic_of
from outpost.contracts import ReadingDict, item_bytes, reading_id, reading_id_prefix
from outpost.errors import TopicError
from outpost.log import get_logger
from outpost.metrics import _HIGHEST_US, _LOWEST_US, Histogram
from outpost.service import ServiceRuntime, run_until, service_main
from outpost.services.ingest.parse import Reject, parse
from outpost.services.ingest.ratelimit import RateLimiter
from outpost.services.ingest.seqstore import SeqStore
from outpost.services.ingest.seqtrack import Seen, SeqState, observe
from outpost.services.ingest.units import UNITS
from outpost.settings import OutpostSettings

NAME = "ingest"
log = get_logger("outpost.ingest")


class _AgeHistogram(Histogram):
    """``reading_age`` with a ``count``: readings of one message that carry the same timestamp have
    the same age, so one record of (age, n) leaves the histogram exactly as n records would. A batch
    stamped once then costs one record instead of one per reading (a record is ~2.4 us, a quarter of
    a batched reading's cost before: docs/benchmarks.md)."""

    __slots__ = ()

    def record_ns_n(self, ns: int, n: int) -> None:
        self._h.record_value(min(max(ns // 1000, _LOWEST_US), _HIGHEST_US), n)


@dataclass(slots=True)
class _Cycle:
    inputs: list[tuple[int, int]] = field(default_factory=list)  # (mid, qos) to acknowledge
    outgoing: set[int] = field(default_factory=set)  # publishes not yet confirmed
    states: dict[str, SeqState] = field(default_factory=dict)  # seq state to commit when done
    sealed: bool = False


class IngestService:
    def __init__(self, settings: OutpostSettings) -> None:
        self.settings = settings
        cfg = self.cfg = settings.ingest
        self.site = settings.site
        self.rt = ServiceRuntime(
            NAME,
            settings,
            durable=cfg.qos > 0,
            manual_ack=cfg.qos > 0,
            tick_s=min(0.05, cfg.flush_ms / 1000.0),
            mqtt5=cfg.mqtt5,
        )
        self.topics = self.rt.topics
        self.metrics = self.rt.metrics
        self.bus = self.rt.bus
        self.events_root = self.topics.root + "/events/"
        self.dev_root = self.topics.root + "/dev/"
        self.seqstore = SeqStore(Path(settings.data_dir) / "ingest.db", cfg.dedup_window)
        self.seq: dict[str, SeqState] = self.seqstore.load()
        self.limiter = RateLimiter(
            cfg.rate_per_device, cfg.burst_per_device, cfg.quarantine_after, cfg.quarantine_s
        )
        self._batches: dict[str, list[dict[str, Any]]] = {}
        self._batched = 0
        self._cycle = _Cycle()
        self._cycles: deque[_Cycle] = deque()
        self._mid_cycle: dict[int, _Cycle] = {}
        self._to_commit: dict[str, SeqState] = {}
        self._oldest_ns = 0
        self._qos = cfg.qos
        self._draining = False
        self._lat = self.metrics.histogram("flush_wait")
        self._age = self.metrics.histograms["reading_age"] = _AgeHistogram()
        self.bus.on_published = self._on_published
        # One ingest process per site: dedup and gap detection need every reading of a device in
        # one place, which a shared subscription (spread per message, not per device) would break.
        pattern = self.topics.all_telemetry
        self._pattern = pattern
        self.bus.subscribe(pattern, self._on_message, qos=cfg.qos)
        self.bus.every(cfg.flush_ms / 1000.0, self._flush_if_due)
        self.bus.every(cfg.commit_ms / 1000.0, self._commit)
        self.rt.extra_status = lambda: {
            "devices": len(self.seq),
            "cycles_open": len(self._cycles),
            "quarantined": self.limiter.quarantined_devices(time.monotonic()),
        }

    # --- intake ----------------------------------------------------------------------------------
    def _start_draining(self) -> None:
        self._draining = True

    def _on_message(self, msg: Message) -> None:
        if self._draining:
            self.metrics.counters["left_for_redelivery"] += 1
            return
        try:
            self._take(msg)
        except Exception as exc:
            # A bug here must not lose the reading silently: the message is acknowledged with its
            # cycle, so it goes to the DLQ with its bytes for a person to look at and replay.
            log.exception("ingest failed on a message")
            self._reject(
                Reject("internal", f"{type(exc).__name__}: {exc}"), topic_of(msg), bytes(msg.payload)
            )

    def _take(self, msg: Message) -> None:
        recv_ns = time.time_ns()
        m = self.metrics.counters
        m["messages"] += 1
        raw = bytes(msg.payload)
        cycle = self._cycle
        if msg.qos:
            cycle.inputs.append((msg.mid, msg.qos))
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self._reject(Reject("bad_topic", "topic is not valid UTF-8"), "<non-utf8>", raw)
            return
        try:
            device = self.topics.device_of(topic)
        except TopicError as exc:
            self._reject(Reject("bad_topic", str(exc)), topic, raw)
            return
        now = time.monotonic()
        if self.limiter.quarantined(device, now):
            self._reject(Reject("quarantined", f"device {device} is quarantined for flooding"), topic, raw)
            return
        cfg = self.cfg
        parsed = parse(raw, max_payload=cfg.max_payload_bytes, max_batch=cfg.max_batch)
        for rej in parsed.rejects:
            self._reject(rej, topic, raw, batch=parsed.batch)
        readings = parsed.readings
        if not readings:
            return
        m["readings"] += len(readings)
        granted = self.limiter.take(device, len(readings), now)
        if granted < len(readings):
            for index, r in readings[granted:]:
                self._reject(
                    Reject("rate_limited", f"device {device} over {cfg.rate_per_device}/s", index, r),
                    topic,
                    raw,
                    batch=parsed.batch,
                )
            readings = readings[:granted]
        lo_ns = recv_ns - int(cfg.max_age_s * 1e9)
        hi_ns = recv_ns + int(cfg.max_future_s * 1e9)
        window = cfg.dedup_window
        batch = self._batches.get(device)
        if batch is None:
            batch = self._batches[device] = []
        before = len(batch)
        states = self.seq
        state = start_state = states.get(device)
        # observe()'s NEW outcome for the next seq (nearly every reading) stays in plain ints: the
        # newest seq, its time, and how many such steps are not yet folded into state's mask.
        last, last_ts, steps = (state.last, state.last_ts, 0) if state is not None else (0, 0, 0)
        full = (1 << window) - 1
        site = self.site
        record_age = self._age.record_ns_n
        # reading_id(site, device, seq), with the hasher seeded once per message and copied per
        # reading: blake2b's constructor is half of reading_id's cost. Same bytes, same digest.
        id_epoch = state.epoch if state is not None else 0
        id_base = hashlib.blake2b(reading_id_prefix(site, device, id_epoch), digest_size=12)
        age_ts, age_n = 0, 0  # a run of accepted readings with one timestamp, recorded as one
        dup = msg.dup
        # The hot loop (docs/benchmarks.md has the profile): the checks of _check() and observe()'s
        # outcome for the next seq are done inline, and only anything else takes the calls.
        for index, r in readings:
            ts, unit = r["ts"], r["unit"]
            if r["device"] != device or ts > hi_ns or ts < lo_ns or unit not in UNITS:
                reject = self._check(r, device, lo_ns, hi_ns)
                if reject is not None:
                    reject.index, reject.item = index, r
                    self._reject(reject, topic, raw, batch=parsed.batch)
                    continue
            value = r["value"]
            canonical, scale, offset = UNITS[unit]
            if scale != 1.0 or offset != 0.0:
                value = value * scale + offset
                if value - value != 0.0:  # a finite value that overflowed to +-inf in conversion
                    reject = Reject("out_of_range", f"value {r['value']!r} {unit} overflows in {canonical}")
                    reject.index, reject.item = index, r
                    self._reject(reject, topic, raw, batch=parsed.batch)
                    continue
            seq = r["seq"]
            if state is not None and seq == last + 1:
                last = seq
                last_ts = ts if ts > last_ts else last_ts
                steps += 1
                gap, late = 0, False
            else:
                if steps and state is not None:  # n NEW steps of shift 1: mask shifted by n, low n bits set
                    mask = ((state.mask << steps) | ((1 << steps) - 1)) & full
                    state = SeqState(last, last_ts, mask, state.epoch)
                    steps = 0
                outcome, gap, new_state = observe(state, seq, ts, window)
                if outcome is Seen.DUPLICATE or outcome is Seen.STALE:
                    if outcome is Seen.DUPLICATE and dup:
                        # The broker redelivered a message we already took (a reconnect raced our ack).
                        m["duplicates_redelivered"] += 1
                        continue
                    reason = "duplicate" if outcome is Seen.DUPLICATE else "stale_seq"
                    self._reject(
                        Reject(reason, f"{device} seq {seq} already seen or too old", index, r),
                        topic,
                        raw,
                        batch=parsed.batch,
                        trace=reading_id(site, device, seq, state.epoch if state else 0),
                    )
                    continue
                state = new_state
                last, last_ts = state.last, state.last_ts
                if gap:
                    m["gaps"] += 1
                    m["missing"] += gap
                late = outcome is Seen.LATE
                if late:
                    m["late"] += 1
                elif outcome is Seen.RESET:
                    m["seq_resets"] += 1
                if state.epoch != id_epoch:
                    id_epoch = state.epoch
                    id_base = hashlib.blake2b(reading_id_prefix(site, device, id_epoch), digest_size=12)
            hasher = id_base.copy()
            hasher.update(b"%d" % seq)
            eid = hasher.hexdigest()
            batch.append(
                {
                    "v": 1,
                    "id": eid,
                    "ts": ts,
                    "trace": eid,
                    "device": device,
                    "seq": seq,
                    "metric": r["metric"],
                    "value": value,
                    "unit": canonical,
                    "ingest_ns": recv_ns,
                    "gap": gap,
                    "late": late,
                }
            )
            if ts == age_ts:
                age_n += 1
            else:
                if age_n:
                    record_age(recv_ns - age_ts, age_n)
                age_ts, age_n = ts, 1
        if age_n:
            record_age(recv_ns - age_ts, age_n)
        if steps and state is not None:
            state = SeqState(last, last_ts, ((state.mask << steps) | ((1 << steps) - 1)) & full, state.epoch)
        if state is not start_state and state is not None:
            states[device] = state
            cycle.states[device] = state
        n = len(batch)
        if n == 0:
            del self._batches[device]
            return
        if self._batched == 0:
            self._oldest_ns = recv_ns
        self._batched += n - before
        # Under load the flush timer runs only between bursts of reads (the bus reads up to 256
        # waiting packets a turn), so batches grow with the load: one publish carries more events.
        if n >= cfg.flush_max or self._batched >= cfg.flush_max * 4:
            self.flush()

    def _check(self, r: ReadingDict, device: str, lo_ns: int, hi_ns: int) -> Reject | None:
        if r["device"] != device:
            return Reject("device_mismatch", f"payload device {r['device']!r} != topic device {device!r}")
        ts = r["ts"]
        if ts > hi_ns:
            return Reject("ts_future", f"ts {ts} is more than {self.cfg.max_future_s}s ahead")
        if ts < lo_ns:
            return Reject("ts_past", f"ts {ts} is more than {self.cfg.max_age_s}s old")
        if r["unit"] not in UNITS:
            return Reject("unknown_unit", f"unit {r['unit']!r} is not in the unit table (docs/units.md)")
        return None

    def _reject(
        self,
        rej: Reject,
        topic: str,
        raw: bytes,
        *,
        batch: bool = False,
        trace: str | None = None,
    ) -> None:
        payload = raw if (rej.item is None or not batch) else item_bytes(rej.item, raw)
        mid = self.rt.dead_letter(
            rej.reason,
            rej.detail,
            topic,
            payload,
            trace=trace,
            index=rej.index if batch else None,
            qos=self.cfg.dlq_qos,
        )
        if self.cfg.dlq_qos:
            self._cycle.outgoing.add(mid)
            self._mid_cycle[mid] = self._cycle

    # --- output ----------------------------------------------------------------------------------
    def _flush_if_due(self) -> None:
        if self._batches or self._cycle.inputs or self._cycle.outgoing:
            self.flush()

    def flush(self) -> None:
        """Publish every waiting batch and seal the current cycle."""
        cycle = self._cycle
        qos = self._qos
        publish = self.bus.publish
        mids = cycle.outgoing
        root = self.events_root
        total = 0
        for device, events in self._batches.items():
            total += len(events)
            mid = publish(root + device, orjson.dumps(events), qos=qos)
            if qos:
                mids.add(mid)
                self._mid_cycle[mid] = cycle
        self._batches = {}
        if total:
            self.metrics.counters["events"] += total
            self._lat.record_ns(time.time_ns() - self._oldest_ns)
        self._batched = 0
        cycle.sealed = True
        self._cycles.append(cycle)
        self._cycle = _Cycle()
        self._complete_cycles()

    def _on_published(self, mid: int) -> None:
        cycle = self._mid_cycle.pop(mid, None)
        if cycle is None:
            return
        cycle.outgoing.discard(mid)
        if not cycle.outgoing:
            self._complete_cycles()

    def _complete_cycles(self) -> None:
        cycles = self._cycles
        while cycles and cycles[0].sealed and not cycles[0].outgoing:
            done = cycles.popleft()
            for mid, qos in done.inputs:
                self.bus.ack(mid, qos)
            self._to_commit.update(done.states)

    def _commit(self) -> None:
        if self._to_commit:
            states, self._to_commit = self._to_commit, {}
            self.seqstore.save(states)
            self.metrics.counters["commits"] += 1

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.rt.start()
        log.info("ingest started", extra={"subscription": self._pattern, "qos": self._qos})

    def stop(self) -> None:
        """Drain: stop intake, flush, wait for confirmations, acknowledge, commit, go offline."""
        # No unsubscribe: that would drop the subscription from the durable session and the broker
        # would not keep what devices send while ingest is down. Messages that arrive from now on
        # are left unacknowledged; the broker redelivers them when ingest comes back.
        self.bus.call(self._start_draining, timeout_s=5)
        self.bus.call(self.flush, timeout_s=5)
        deadline = time.monotonic() + 10
        while self._cycles and time.monotonic() < deadline:
            time.sleep(0.01)
        self.rt.stop()
        self._commit()
        self.seqstore.close()
        log.info("ingest stopped", extra={"counters": dict(self.metrics.counters)})


def run(settings: OutpostSettings, stop: threading.Event) -> IngestService:
    """Run ingest until ``stop`` is set; returns the (stopped) service for inspection."""
    return run_until(IngestService(settings), stop)


def main() -> None:
    service_main(IngestService)
