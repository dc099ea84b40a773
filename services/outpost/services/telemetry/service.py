"""The telemetry service: every service's metrics batches in, rollups out, to the status page and,
within the uplink budget, through the spool to InfluxDB (docs/telemetry.md).

Threads: the bus's **network thread** decodes batches and statuses and folds them into the
:class:`~.rollup.Rollups` (pure, in memory, microseconds), and closes finished windows on a timer;
the kit's **worker** (one thread) does everything that blocks, in order: thinning by the budget,
the spool (SQLite), the writes (HTTP). Counts the worker makes come back with its result and are
added to the metrics on the network thread (a metrics registry is updated from one thread).

Input (all ``Ack.AT_ONCE``: a rollup lost with the process is lost either way, and what matters
is durable from the spool on): ``.../metrics/+`` (bad batches are dead-lettered by the kit like
any service's input), the retained ``.../svc/+/status`` and the uplink bridge's state (recovery,
``service_down``), and ``.../events/+`` only when ``raw_device_classes`` names a class (privacy:
aggregates only by default).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from outpost.backoff import backoff_delay
from outpost.contracts import EVENT, METRICS, STATUS, EventDict, MetricsBatch, Status, encode, header
from outpost.errors import ConfigError
from outpost.log import get_logger
from outpost.service import SKIP, Ack, Inbound, Peek, ServiceRuntime, run_until, service_main
from outpost.services.registry import OutpostSettings
from outpost.services.telemetry.budget import Budget
from outpost.services.telemetry.catalog import Point, Priority
from outpost.services.telemetry.page.server import StatusPage
from outpost.services.telemetry.rollup import Rollups
from outpost.services.telemetry.spool import Spool
from outpost.services.telemetry.writer import WriteFailed, Writer
from outpost.topics import device_class

NAME = "telemetry"
log = get_logger("outpost.services.telemetry")

FLUSH_ROUNDS = 20
"""Write requests one flush job may make before it gives the worker back (a long backlog is sent
over several jobs, so a new window's spooling never waits behind all of it)."""


REFUSED = frozenset((400, 422))
"""Statuses that refuse the request's lines (InfluxDB 2 writes the good lines of a partial write and
answers 400 for the rest): those points leave the spool, counted, instead of blocking it."""


@dataclass(slots=True)
class Outcome:
    """What a worker job did, counted on the network thread."""

    counts: Counter[str] = field(default_factory=Counter)
    error: str | None = None
    retry_in_s: float | None = None
    wrote: bool = False
    """A write went through (a store that was failing is back)."""
    spooled: tuple[int, int] = (0, 0)


def _p(prio: Priority) -> str:
    return prio.name.lower()


class Telemetry:
    def __init__(self, settings: OutpostSettings) -> None:
        cfg = self.cfg = settings.telemetry
        self.rt = ServiceRuntime(NAME, settings, worker_threads=1, worker_bound=64)
        self.topics = self.rt.topics
        self.metrics = self.rt.metrics
        self.rollups = Rollups(settings.site, cfg.rollup_s, started_ns=self.rt.started_ns)
        self.budget = Budget(cfg.budget_bytes_per_min, cfg.rollup_s)
        self.raw_classes = frozenset(cfg.raw_device_classes)
        self.writer = Writer(cfg.influx) if cfg.influx.url else None
        self.spool = (
            Spool(self.rt.state_dir("telemetry") / "spool.db", int(cfg.spool_max_mb * 1_000_000))
            if self.writer is not None
            else None
        )
        self._in_flight = 0
        self._retry_at = 0.0
        self._failures = 0
        self._spooled = (self.spool.count, self.spool.bytes) if self.spool else (0, 0)
        self._last_error: str | None = None
        self.rt.extra_status = self._state
        self.page = StatusPage(cfg.page, settings) if cfg.page.enabled else None
        """The status page and /metrics (its own live view from the broker; fed each closed window)."""
        self.rt.subscribe(self.topics.all_metrics, self._on_metrics, contract=METRICS, ack=Ack.AT_ONCE, qos=0)
        self.rt.subscribe(
            self.topics.all_service_status,
            self._on_status,
            contract=STATUS,
            ack=Ack.AT_ONCE,
            qos=1,
            screen=_skip_empty,
        )
        self.rt.subscribe(
            self.topics.uplink_state(), self._on_uplink, ack=Ack.AT_ONCE, qos=1, screen=_skip_empty
        )
        if self.raw_classes:
            self.rt.subscribe(self.topics.all_events, self._on_events, contract=EVENT, ack=Ack.AT_ONCE, qos=0)
        self.rt.every(min(1.0, cfg.rollup_s / 4), self._tick)

    # --- input (network thread) ------------------------------------------------------------------
    def _on_metrics(self, inbound: Inbound[MetricsBatch]) -> None:
        now = time.time_ns()
        for _i, batch in inbound.items:
            self.rollups.add(batch, now)

    def _on_status(self, inbound: Inbound[Status]) -> None:
        now = time.time_ns()
        # a retained status is the broker's copy from before this service started: a service found
        # down then is down (its recovery will count), but its alert went out when it went down
        alert = not inbound.msg.retain
        for _i, st in inbound.items:
            if st.service == NAME:  # its own going down is never seen by itself
                continue
            if st.state == "stopped":  # stopped on purpose: no failure to recover from
                self.rollups.stopped(st.service)
            else:
                self.rollups.status(st.service, st.state == "online", now, alert=alert)

    def _on_uplink(self, inbound: Inbound[bytes]) -> None:
        up = inbound.raw.strip() == b"1"
        self.rollups.status("uplink", up, time.time_ns(), alert=not inbound.msg.retain)

    def _on_events(self, inbound: Inbound[EventDict]) -> None:
        now = time.time_ns()
        for _i, ev in inbound.items:
            if device_class(ev["device"]) in self.raw_classes:
                self.rollups.reading(ev["device"], ev["metric"], ev["value"], ev["ts"], now)
                self.metrics.counters["raw_readings"] += 1

    # --- windows (network thread) ----------------------------------------------------------------
    def _tick(self) -> None:
        now = time.time_ns()
        points = self.rollups.close(now)
        if points:
            self.metrics.counters["windows"] += 1
            self.metrics.counters["points"] += len(points)
            if self.page is not None:
                self.page.on_rollup(points)
            self._publish(points)
        if self.writer is None:
            return
        if points:
            self._submit(lambda: self._store(points, now))
        elif not self._in_flight and self._spooled[0] and time.monotonic() >= self._retry_at:
            self._submit(lambda: self._flush(time.time_ns(), Outcome()))

    def _publish(self, points: list[Point]) -> None:
        """A closed window on the bus, for the uplink (docs/uplink.md): each alert on its own
        (``telemetry/alerts``, the uplink's most urgent stream), the other points in one message
        (``telemetry/rollups``). QoS 1: the uplink acknowledges only what its outbox holds."""
        rest: list[dict[str, object]] = []
        for p in points:
            doc = {"measurement": p.measurement, "tags": dict(p.tags), "fields": p.fields, "ts_ns": p.ts_ns}
            if p.priority is Priority.ALERT:
                self.rt.publish(self.topics.telemetry_alerts, encode("", **doc))
                self.metrics.counters["alerts_published"] += 1
            else:
                rest.append(doc)
        if rest:
            msg = header()
            msg.update(window_ns=points[0].ts_ns, points=rest)
            self.rt.publish(self.topics.telemetry_rollups, orjson.dumps(msg))

    def _submit(self, job: Callable[[], Outcome]) -> None:
        self._in_flight += 1
        self.rt.submit(job, self._done)

    def _done(self, result: Outcome | BaseException) -> None:
        self._in_flight -= 1
        if isinstance(result, BaseException):
            self.metrics.counters["job_failures"] += 1
            log.error("telemetry job failed", extra={"error": f"{type(result).__name__}: {result}"[:300]})
            self._retry_at = time.monotonic() + 5.0
            return
        self.metrics.counters.update(result.counts)
        self._spooled = result.spooled
        if result.retry_in_s is not None:
            self._retry_at = time.monotonic() + result.retry_in_s
        if result.error is not None and result.error != self._last_error:
            log.warning("cannot write rollups; they wait in the spool", extra={"error": result.error})
            self.rt.set_problems([f"rollups wait in the spool: {result.error}"])
        elif result.error is None and result.wrote and self._last_error is not None:
            log.info("writing rollups again")
            self.rt.set_problems([])
        if result.error is not None or result.wrote:
            self._last_error = result.error

    # --- the worker ------------------------------------------------------------------------------
    def _store(self, points: list[Point], now_ns: int) -> Outcome:
        """Thin a closed window by the budget, spool what is kept, then try to write."""
        assert self.spool is not None
        out = Outcome()
        window = points[0].ts_ns // self.rollups.window_ns if points else 0
        kept, thinned = self.budget.thin(points, window)
        for p in thinned:
            out.counts[f"points_downsampled.{_p(p.priority)}"] += 1
        gone = self.spool.append(kept)
        for p in kept:
            out.counts[f"points_spooled.{_p(p.priority)}"] += 1
        for prio, n in gone.items():
            out.counts[f"points_dropped.{_p(prio)}"] += n
        if time.monotonic() >= self._retry_at:
            return self._flush(now_ns, out)
        out.spooled = (self.spool.count, self.spool.bytes)
        return out

    def _flush(self, now_ns: int, out: Outcome) -> Outcome:
        """Write what the budget lets out of the spool, oldest first, until nothing more fits, the
        spool is empty or a write fails (then the next try waits a backoff)."""
        assert self.spool is not None and self.writer is not None
        most = self.cfg.influx.batch_points
        for _ in range(FLUSH_ROUNDS):
            taken = self.budget.take(self.spool.head(most), now_ns, most=most)
            if not taken:
                break
            lines = self.spool.lines([p.seq for p in taken])
            try:
                sent = self.writer.write(lines)
            except WriteFailed as exc:
                if exc.status in REFUSED:  # the lines themselves: a retry would block the spool
                    self.spool.remove(taken)
                    for p in taken:
                        out.counts[f"points_refused.{_p(p.priority)}"] += 1
                    log.error("the store refused rollup lines; they are dropped", extra={"error": str(exc)})
                    continue
                self.budget.refund(taken)
                self._failures += 1
                out.counts["write_failures"] += 1
                out.error = str(exc)
                out.retry_in_s = backoff_delay(self._failures - 1, 1.0, self.cfg.influx.retry_max_s)
                break
            self._failures = 0
            out.wrote = True
            self.spool.remove(taken)
            out.counts["writes"] += 1
            out.counts["bytes_sent"] += sent
            for p in taken:
                out.counts[f"points_sent.{_p(p.priority)}"] += 1
            now_ns = time.time_ns()
        out.spooled = (self.spool.count, self.spool.bytes)
        return out

    # --- status and lifecycle --------------------------------------------------------------------
    def _state(self) -> dict[str, object]:
        return {
            "spool_points": self._spooled[0],
            "spool_bytes": self._spooled[1],
            "upstream": self.writer is not None,
            "store_error": self._last_error,
        }

    def _drain(self) -> None:
        """On SIGTERM: the open window is closed early (a partial window, at its usual timestamp)
        and everything closed is spooled and tried once more before the process ends. Only a
        kill loses the open window."""
        now = time.time_ns()
        points = self.rollups.close(now + self.rollups.window_ns)
        if points:
            self.metrics.counters["windows"] += 1
            self.metrics.counters["points"] += len(points)
            if self.page is not None:
                self.page.on_rollup(points)
            self._publish(points)
            if self.writer is not None:
                self._submit(lambda: self._store(points, now))

    def start(self) -> None:
        self.rt.start()
        if self.page is not None:
            try:
                log.info("status page", extra={"address": self.page.start()})
            except ConfigError as exc:  # the port is taken: the rollups go on without a page
                log.error("no status page", extra={"error": str(exc)})
                self.rt.set_problems([str(exc)])
                self.page = None

    def stop(self) -> None:
        try:
            self.rt.stop(self._drain)
        finally:
            if self.page is not None:
                self.page.stop()
            if self.writer is not None:
                self.writer.close()
            if self.spool is not None:
                self.spool.close()


def _skip_empty(_key: str, msg: Peek) -> str | None:
    """A retained message cleared (an empty payload) is no status: nothing to do."""
    return SKIP if not msg.payload else None


def run(settings: OutpostSettings, stop: threading.Event) -> Telemetry:
    return run_until(Telemetry(settings), stop)


def main() -> None:
    service_main(Telemetry, OutpostSettings)
