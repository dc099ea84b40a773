"""The ingest service: ``.../dev/{device}/telemetry`` in, ``.../events/{device}`` and ``.../dlq/ingest`` out.

Delivery: at-least-once on the wire, exactly-once in effect.

* It subscribes at QoS 1 with a durable session, and the kit acknowledges a telemetry message only
  after the broker has confirmed every event and dead letter it produced (``Ack.AFTER_COMMIT``: the
  flush is ingest's commit). A kill -9 at any point leaves unacknowledged messages on the broker,
  which redelivers them on restart.
* An event's id is derived from (site, device, seq), so a reading re-emitted after a crash carries
  the id it had the first time; consumers drop the copy by id.
* Which seqs were seen is committed to SQLite, in batches, only once their events are confirmed.

Messages are processed as they arrive (decoded by the kit against the reading contract), their
events are batched per device and published once what waited on the socket is read, or sooner when
``flush_max`` events wait.
A flush seals the kit's batch turn: once its publishes are confirmed, its messages are acknowledged
and its seq state is queued for the SQLite commit. Everything runs on the bus's network thread, so
there are no locks.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any, Final

import orjson

from outpost.bus import Alarm
from outpost.contracts import READING, SCHEMA_VERSION, ReadingDict, Reject, reading_id, reading_id_prefix
from outpost.log import get_logger
from outpost.ratelimit import RateLimiter
from outpost.service import SKIP, Ack, Inbound, Peek, Rejected, ServiceRuntime, run_until, service_main
from outpost.services.ingest.parse import OWN_REASONS
from outpost.services.ingest.seqstore import SeqStore
from outpost.services.ingest.seqtrack import Seen, SeqState, observe
from outpost.services.ingest.units import UNITS
from outpost.services.registry import OutpostSettings
from outpost.topics import device_class

NAME = "ingest"
CLASSES_CACHED: Final = 100_000
"""Device ids whose ``readings.{device_class}`` counter ingest remembers (cleared when full)."""
log = get_logger("outpost.ingest")


class IngestService:
    def __init__(self, settings: OutpostSettings) -> None:
        self.settings = settings
        cfg = self.cfg = settings.ingest
        self.site = settings.site
        self.rt = ServiceRuntime(
            NAME,
            settings,
            reasons=OWN_REASONS,
            durable=cfg.qos > 0,
            mqtt5=cfg.mqtt5,
            dlq_qos=cfg.dlq_qos,
        )
        self.topics = self.rt.topics
        self.metrics = self.rt.metrics
        self.events_root = self.topics.root + "/events/"
        self.seqstore = SeqStore(self.rt.state_dir() / "ingest.db", cfg.dedup_window)
        self.seq: dict[str, SeqState] = self.seqstore.load()
        self._retained = self.seqstore.load_retained()
        self._retained_new: dict[str, bytes] = {}
        self.limiter = RateLimiter(
            cfg.rate_per_device,
            cfg.burst_per_device,
            cfg.quarantine_after,
            cfg.quarantine_s,
            cfg.quarantine_qos0_messages_per_s,
        )
        self._batches: dict[str, list[dict[str, Any]]] = {}
        self._batched = 0
        self._states: dict[str, SeqState] = {}  # seq state of the batch turn, committed once it is acked
        self._to_commit: dict[str, SeqState] = {}
        self._committing = False
        self._commit_due: Alarm = self.rt.alarm(self._commit)
        self._oldest_ns = 0
        self._qos = cfg.qos
        self._class_counter: dict[str, str] = {}
        """device -> its counter ``readings.{device_class}`` (one dict lookup a message on the hot
        path; bounded by :data:`CLASSES_CACHED`)."""
        self._lat = self.metrics.histogram("flush_wait")
        self._age = self.metrics.histogram("reading_age")
        # One ingest process per site: dedup and gap detection need every reading of a device in
        # one place, which a shared subscription (spread per message, not per device) would break.
        # Everything under dev/ (not dev/+/telemetry): a telemetry topic with extra levels must
        # arrive to be dead-lettered as bad_topic; the other kinds (status, cmd) are ignored.
        self._pattern = self.topics.all_device_topics
        self.rt.subscribe(
            self._pattern,
            self._on_readings,
            contract=READING,
            ack=Ack.AFTER_COMMIT,
            qos=cfg.qos,
            topic_key=self.topics.telemetry_device,
            max_bytes=cfg.max_payload_bytes,
            max_items=cfg.max_batch,
            lenient=True,
            screen=self._screen,
            charge=self._charge,
        )
        # a durable session of an older ingest still holds dev/+/telemetry: with both, every
        # reading would arrive twice
        legacy = self.topics.all_telemetry
        self.rt.bus.on_connect(lambda _present: self.rt.bus.unsubscribe(legacy))
        self.rt.shed_details["quarantined"] = (
            f"the device flooded ({cfg.quarantine_after} readings over its rate, or more than "
            f"{cfg.quarantine_qos0_messages_per_s} QoS 0 messages, within a second) and is quarantined for "
            f"{cfg.quarantine_s}s; its messages are not read"
        )
        # flushed once what waited on the socket is read: a light load waits for nothing, a heavy
        # one batches what a burst brought. No timer: every reading arrives through a read.
        self.rt.after_reading(self.flush)
        self.rt.extra_status = lambda: {
            "devices": len(self.seq),
            "quarantined": self.limiter.quarantined_devices(time.monotonic()),
        }

    # --- intake ----------------------------------------------------------------------------------
    def _screen(self, device: str, msg: Peek) -> str | None:
        """Before a message is decoded: a quarantined device's messages are shed unread (counted,
        dead-lettered in aggregate by the kit), and each QoS 0 message counts towards the device's
        message rate (``quarantine_qos0_messages_per_s``: a QoS 1 backlog the broker kept while
        ingest was down arrives all at once, and must not quarantine its device); an empty message
        (a retained message being cleared) is counted; a retained message the broker replays is
        dead-lettered once."""
        if not msg.payload:
            self.metrics.counters["empty_ignored"] += 1
            return SKIP
        if msg.retain:
            return self._replayed(msg)
        now = time.monotonic()
        if msg.qos == 0:
            if not self.limiter.admit(device, now):
                return "quarantined"
        elif self.limiter.quarantined(device, now):
            return "quarantined"
        return None

    def _replayed(self, msg: Peek) -> str | None:
        """A message with the retain flag: the broker's stored copy, sent again at every subscribe
        (each restart and reconnect). Telemetry must not be retained; the first time a stored copy
        is seen it is dead-lettered as ``retained`` (with its bytes, for a person to replay), and
        after that, on later subscribes, only counted (``retained_replays``). Live, a retained
        publish reaches ingest as any other message, and is taken or refused then."""
        topic = msg.topic
        digest = hashlib.blake2b(msg.payload, digest_size=16).digest()
        if self._retained.get(topic) == digest:
            self.metrics.counters["retained_replays"] += 1
            return SKIP
        self._retained[topic] = digest
        self._retained_new[topic] = digest
        self._commit_soon()
        raise Rejected(
            "retained",
            "a retained telemetry message, replayed by the broker when ingest subscribed: readings "
            "must not be retained (clear it with an empty retained publish); dead-lettered once",
        )

    def _count_class(self, device: str) -> str:
        """The counter of accepted readings for ``device``'s class, remembered: a device's class is
        a regular expression away, which costs more than the rest of a small message's counting.
        The cache is cleared when full, so a flood of new device ids costs a match, never memory."""
        if len(self._class_counter) >= CLASSES_CACHED:
            self._class_counter.clear()
        key = self._class_counter[device] = f"readings.{device_class(device)}"
        return key

    def _charge(self, device: str, n: int) -> None:
        """Readings the decoder refused count against the device's rate like good ones, so a
        device sending huge bad batches is quarantined as a flooding one is."""
        self.limiter.take(device, n, time.monotonic())

    def _on_readings(self, msg: Inbound[ReadingDict]) -> None:
        """The readings of one telemetry message that fit the contract (the kit has dead-lettered
        the rest): checked against the device, the clock and the unit table, deduplicated, turned
        into events."""
        recv_ns = time.time_ns()
        m = self.metrics.counters
        device = msg.key
        now = time.monotonic()
        cfg = self.cfg
        readings = msg.items
        reject = self.rt.reject
        if msg.raw.count(b'"') != _QUOTES_PER_READING * len(readings):
            readings = self._without_duplicate_keys(msg)
            if not readings:
                return
        m["readings"] += len(readings)
        granted = self.limiter.take(device, len(readings), now)
        if granted < len(readings):
            for index, r in readings[granted:]:
                reject(msg, Reject("rate_limited", f"device {device} over {cfg.rate_per_device}/s", index, r))
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
        # readings of one message stamped alike are recorded as one (age, n): a record is ~2.4 us, a
        # quarter of a batched reading's cost before (docs/benchmarks.md)
        record_age = self._age.record_ns
        # reading_id(site, device, seq), with the hasher seeded once per message and copied per
        # reading: blake2b's constructor is half of reading_id's cost. Same bytes, same digest.
        id_epoch = state.epoch if state is not None else 0
        id_base = hashlib.blake2b(reading_id_prefix(site, device, id_epoch), digest_size=12)
        age_ts, age_n = 0, 0  # a run of accepted readings with one timestamp, recorded as one
        dup = msg.dup
        header_v = SCHEMA_VERSION
        # The hot loop (docs/benchmarks.md has the profile): the checks of _check() and observe()'s
        # outcome for the next seq are done inline, and only anything else takes the calls.
        for index, r in readings:
            ts, unit = r["ts"], r["unit"]
            if r["device"] != device or ts > hi_ns or ts < lo_ns or unit not in UNITS:
                bad = self._check(r, device, lo_ns, hi_ns)
                if bad is not None:
                    bad.index, bad.item = index, r
                    reject(msg, bad)
                    continue
            value = r["value"]
            canonical, scale, offset = UNITS[unit]
            if scale != 1.0 or offset != 0.0:
                value = value * scale + offset
                if value - value != 0.0:  # a finite value that overflowed to +-inf in conversion
                    reject(
                        msg,
                        Reject(
                            "out_of_range", f"value {r['value']!r} {unit} overflows in {canonical}", index, r
                        ),
                    )
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
                    reject(
                        msg,
                        Reject(reason, f"{device} seq {seq} already seen or too old", index, r),
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
                    "v": header_v,
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
            self._states[device] = state
        n = len(batch)
        if n == 0:
            del self._batches[device]
            return
        if n > before:  # accepted readings, per device class
            key = self._class_counter.get(device)
            if key is None:
                key = self._count_class(device)
            m[key] += n - before
        if self._batched == 0:
            self._oldest_ns = recv_ns
        self._batched += n - before
        # Under load the flush timer runs only between bursts of reads (the bus reads up to 256
        # waiting packets a turn), so batches grow with the load: one publish carries more events.
        if n >= cfg.flush_max or self._batched >= cfg.flush_max * 4:
            self.flush()

    def _without_duplicate_keys(self, msg: Inbound[ReadingDict]) -> list[tuple[int, ReadingDict]]:
        """The readings of ``msg`` with no key twice; the others are dead-lettered as
        ``duplicate_key`` (a JSON parser keeps the last value, so ``{"value": 1, "value": 99}``
        would silently become 99). Only run when the message's quote count is not the 18 of six
        keys and three string values per reading (docs/ingest.md, "Duplicate keys"): escaped
        quotes, bad items or a duplicate key; the common case costs one ``bytes.count``."""
        dups: dict[int, str] = {}
        try:
            doc = json.loads(msg.raw, object_pairs_hook=_pairs_checked)
        except (ValueError, RecursionError):
            return msg.items
        objs = doc if isinstance(doc, list) else [doc]
        for i, obj in enumerate(objs):
            if isinstance(obj, _Dup):
                dups[i] = obj.key
        if not dups:
            return msg.items
        kept: list[tuple[int, ReadingDict]] = []
        for index, r in msg.items:
            key = dups.get(index)
            if key is None:
                kept.append((index, r))
            else:
                detail = f"key {key!r} appears more than once (a parser would keep only the last)"
                self.rt.reject(msg, Reject("duplicate_key", detail, index if msg.batch else None, r))
        return kept

    def _check(self, r: ReadingDict, device: str, lo_ns: int, hi_ns: int) -> Reject | None:
        if r["device"] != device:
            return Reject("device_mismatch", f"payload device {r['device']!r} != topic device {device!r}")
        ts = r["ts"]
        if ts > hi_ns:
            return Reject("ts_future", f"ts {ts} is more than {self.cfg.max_future_s}s ahead")
        if ts < lo_ns:
            return Reject("ts_past", f"ts {ts} is more than {self.cfg.max_age_s:g} s old{unit_hint(ts)}")
        if r["unit"] not in UNITS:
            return Reject("unknown_unit", f"unit {r['unit']!r} is not in the unit table (docs/ingest.md)")
        return None

    # --- output ----------------------------------------------------------------------------------
    def flush(self) -> None:
        """Publish every waiting batch and seal the kit's batch turn: its messages are acknowledged,
        and their seq state queued for commit, once these publishes are confirmed. Called after
        every read and on a timer: nothing to do is the common case, and costs one check."""
        turn = self.rt.batch
        if turn is None and not self._batches:
            return
        publish = self.rt.publish
        qos = self._qos
        root = self.events_root
        total = 0
        for device, events in self._batches.items():
            total += len(events)
            publish(root + device, orjson.dumps(events), qos=qos, for_=turn)
        self._batches = {}
        if total:
            self.metrics.counters["events"] += total
            self._lat.record_ns(time.time_ns() - self._oldest_ns)
        self._batched = 0
        states, self._states = self._states, {}
        self.rt.committed((lambda: self._confirmed(states)) if states else None)

    def _confirmed(self, states: dict[str, SeqState]) -> None:
        self._to_commit.update(states)
        self._commit_soon()

    def _commit_soon(self) -> None:
        """Commit ``commit_ms`` from now, once for everything confirmed meanwhile (the thread is
        woken only when there is state to commit, not polled)."""
        self._commit_due.soon(self.cfg.commit_ms / 1000.0)

    def _commit(self) -> None:
        """Commit the acknowledged seq state on the kit's worker: an fsync on the network thread
        would hold up every reading behind it (it was most of ingest's p99: docs/benchmarks.md)."""
        if not (self._to_commit or self._retained_new) or self._committing:
            return
        states, self._to_commit = self._to_commit, {}
        retained, self._retained_new = self._retained_new, {}
        self._committing = True

        self.rt.submit(
            lambda: self.seqstore.save(states, retained),
            lambda result: self._committed(states, retained, result),
        )

    def _committed(self, states: dict[str, SeqState], retained: dict[str, bytes], result: object) -> None:
        self._committing = False
        if isinstance(result, BaseException) or self._to_commit or self._retained_new:
            self._commit_soon()  # what came meanwhile, or this again (a full disk may clear)
        if isinstance(result, BaseException):
            # kept for the next try (a full disk may clear); newer state queued meanwhile wins
            log.error("seq state commit failed; will retry", extra={"error": str(result)})
            self.metrics.counters["commit_failures"] += 1
            self._to_commit = {**states, **self._to_commit}
            self._retained_new = {**retained, **self._retained_new}
            return
        self.metrics.counters["commits"] += 1

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.rt.start()
        log.info("ingest started", extra={"subscription": self._pattern, "qos": self._qos})

    def stop(self) -> None:
        """Drain: stop intake, flush, wait for confirmations and acknowledgements, commit, go offline.
        No unsubscribe: that would drop the subscription from the durable session and the broker
        would not keep what devices send while ingest is down."""
        self.rt.stop(self.flush)  # the worker has finished its commits when this returns
        if self._to_commit or self._retained_new:
            self.seqstore.save(self._to_commit, self._retained_new)
            self.metrics.counters["commits"] += 1
        self.seqstore.close()
        log.info("ingest stopped", extra={"counters": dict(self.metrics.counters)})


_UNIT_GUESSES = ((10**9, "seconds", "1e9"), (10**6, "milliseconds", "1e6"), (10**3, "microseconds", "1e3"))


def unit_hint(ts: int) -> str:
    """What a ``ts`` too old to be nanoseconds probably is: a device sending seconds (or ms, us)
    since the epoch reads as a 1970 date in nanoseconds."""
    now = time.time_ns()
    for factor, name, times in _UNIT_GUESSES:
        if abs(ts * factor - now) < 365 * 86400 * 10**9:
            return f"; ts is UTC epoch nanoseconds, and this looks like {name}: multiply by {times}"
    return "; ts is UTC epoch nanoseconds"


_QUOTES_PER_READING = 18
"""Six keys and three string values (device, metric, unit): the quotes of a reading without escapes."""


class _Dup(dict[str, Any]):
    """An object that had a key twice (``key``), as :func:`_pairs_checked` returns it."""

    key = ""


def _pairs_checked(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    seen: set[str] = set()
    dup = _Dup(out)
    for k, _ in pairs:
        if k in seen:
            dup.key = k
            break
        seen.add(k)
    return dup


def run(settings: OutpostSettings, stop: threading.Event) -> IngestService:
    """Run ingest until ``stop`` is set; returns the (stopped) service for inspection."""
    return run_until(IngestService(settings), stop)


def main() -> None:
    service_main(IngestService, OutpostSettings)
