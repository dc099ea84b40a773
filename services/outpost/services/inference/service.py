"""The inference service: ``.../events/{device}`` in, ``.../inference/{model}/{device}`` out.

Two threads, each owning its own state:

* the bus's **network thread** parses events, feeds the per-device windows, queues a request per
  event that triggers a model in a micro-batch (up to ``max_batch``, or until the first waited
  ``max_wait_ms``: Triton's dynamic batcher, :mod:`.batcher`), scores each batch with one session
  call, publishes the scores and runs the shadow model; all inline, so bookkeeping and
  acknowledgements need no locks, as in ingest;
* the **loader** polls the registry and loads a new version (checksum, backend, warm-up) beside the
  one serving, then hands it to the network thread.

Hot swap without dropping or double-scoring: a request names the version that was active when its
event arrived and is scored by exactly that version; at a swap the old version's waiting batch is
scored before the old version is closed. A score's id is derived from (model, event id), never the
version, so a redelivered event scored after a swap still carries the id it had.

Delivery: the subscription is QoS 1 with a durable session; the kit decodes each events message
against the event contract and acknowledges it (``Ack.AFTER_OUTPUTS``) once every score and dead
letter it produced is confirmed by the broker: each request it queued holds its turn until scored.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from outpost.acks import Turn
from outpost.bus import Alarm
from outpost.contracts import EVENT, SCHEMA_VERSION, EventDict, Reject, derived_id, encode
from outpost.errors import ConfigError, OutpostError
from outpost.log import get_logger
from outpost.metrics import Histogram
from outpost.service import Ack, Inbound, ServiceRuntime, run_until, service_main
from outpost.services.inference.backends.base import ModelLoadError
from outpost.services.inference.batcher import MicroBatcher
from outpost.services.inference.features import FeatureError, Snapshot, Windows, feature_matrix, snapshot
from outpost.services.inference.loaded import LoadedModel, load_model
from outpost.services.inference.manifest import Trigger
from outpost.services.inference.registry import PACKAGED_MODELS, Registry
from outpost.services.inference.windowstore import WindowStore
from outpost.services.registry import OutpostSettings

NAME = "inference"
log = get_logger("outpost.inference")

MAX_EVENTS_PAYLOAD = 4_000_000
RECENT_IDS = 1024
"""Event ids remembered per device to drop a redelivered event (its score is already out)."""


@dataclass(slots=True, eq=False)
class Request:
    model: LoadedModel
    shadow: LoadedModel | None
    snap: Snapshot
    """The device's windows when the event arrived (the union of what active and shadow read)."""
    device: str
    event_id: str
    trace: str
    event_ts: int
    origin_ns: int
    """When the reading reached the site (ingest's ``ingest_ns``), for event-to-score latency."""
    enq_ns: int
    turn: Turn
    """The events message's turn, held until this request is scored or dead-lettered."""


@dataclass(slots=True, eq=False)
class _Served:
    """What the network thread uses for one model name."""

    active: LoadedModel | None = None
    shadow: LoadedModel | None = None
    error: str = ""
    metrics: tuple[str, ...] = ()
    """The metrics whose windows a request copies, and how many values of each."""
    window: int = 1
    trigger: Trigger | None = None
    """While nothing serves the model: its manifest's trigger, so unscored events are counted."""


@dataclass(slots=True)
class _Result:
    request: Request
    version: str
    score: float
    label: str
    confidence: float
    alert: bool
    queue_ms: float
    compute_ms: float
    batch: int


REASONS = ("bad_event", "device_mismatch", "bad_features", "model_error")
"""Inference's own dead-letter reasons, beside the kit's (an event that does not fit the contract
is ``bad_event``, with the precise field in the detail)."""


def score_id(model: str, event_id: str) -> str:
    """The id of a score: the same event scored by a model always gets the same id, whichever
    version scored it, so a consumer drops a redelivered score by id."""
    return derived_id(model, event_id)


class InferenceService:
    def __init__(self, settings: OutpostSettings, *, registry: Registry | None = None) -> None:
        self.settings = settings
        cfg = self.cfg = settings.inference
        self.rt = ServiceRuntime(
            NAME,
            settings,
            reasons=REASONS,
            durable=cfg.qos > 0,
            mqtt5=False,
        )
        self.topics = self.rt.topics
        self.metrics = self.rt.metrics
        self.bus = self.rt.bus
        data = self.rt.state_dir("inference")
        self.engine_dir = data / "engines"
        self.registry = registry or Registry(cfg.models_dir or PACKAGED_MODELS, data / "registry.db")
        known = self.registry.names()
        unknown = sorted(set(cfg.models) - set(known))
        if unknown:
            raise ConfigError(
                f"inference.models names {unknown}, which {self.registry.models_dir} does not hold "
                f"(it has: {', '.join(known) or 'nothing'})"
            )
        self.names = list(cfg.models) or known
        self.reported_topic = self.topics.control(NAME, "reported")
        self.inference_root = self.topics.root + "/inference/"
        # network thread
        self.windows = Windows(1, max_devices=cfg.max_devices)
        self.window_store = WindowStore(data / "windows.db")
        self.rt.every(cfg.checkpoint_s, self._checkpoint)
        self.served: dict[str, _Served] = {n: _Served() for n in self.names}
        self._recent: dict[str, tuple[set[str], deque[str]]] = {}
        self.batcher: MicroBatcher[LoadedModel, Request] = MicroBatcher(
            cfg.max_batch, int(cfg.max_wait_ms * 1e6)
        )
        self._due: Alarm = self.rt.alarm(self._score_due, clock=time.perf_counter_ns)
        """The one wake-up for the oldest partial batch (on the batcher's clock)."""
        # loader
        self._stop = threading.Event()
        self._loader = threading.Thread(target=self._load_loop, name="inference-loader", daemon=True)
        self._loaded: dict[str, tuple[LoadedModel | None, LoadedModel | None]] = {}
        self._problems: dict[str, str] = {}
        """Per model, why nothing serves it (loader thread): the status says degraded with them."""
        self._revision: tuple[int, tuple[tuple[str, ...], ...]] = (-1, ())

        m = self.metrics
        self._queue_wait = m.histogram("queue_wait")
        self._compute = m.histogram("compute")
        self._e2s = m.histogram("event_to_score")
        self._shadow_compute = m.histogram("shadow_compute")
        self._infer: dict[str, Histogram] = {}
        """Per model version (its ref), the histogram ``infer.{model}.{version}``."""
        self.rt.subscribe(
            self.topics.all_events,
            self._on_events,
            contract=EVENT,
            ack=Ack.AFTER_OUTPUTS,
            qos=cfg.qos,
            topic_key=self.topics.event_device,
            max_bytes=MAX_EVENTS_PAYLOAD,
            max_items=100_000,
            invalid_reason="bad_event",
        )
        self.rt.extra_status = self._status

    # --- status ----------------------------------------------------------------------------------
    def _status(self) -> dict[str, Any]:
        c = self.metrics.counters
        models: dict[str, Any] = {}
        for name, s in self.served.items():
            shadow_rows = c[f"shadow_rows.{name}"]
            models[name] = {
                "active": s.active.manifest.version if s.active else None,
                "backend": s.active.backend.name if s.active else None,
                "shadow": s.shadow.manifest.version if s.shadow else None,
                "shadow_agreement": round(c[f"shadow_agree.{name}"] / shadow_rows, 4)
                if shadow_rows
                else None,
                "error": s.error or None,
            }
        return {"models": models, "waiting": len(self.batcher), "devices": self.windows.devices}

    def _report(self) -> None:
        self.rt.publish(self.reported_topic, encode(**self._status()), retain=True)

    # --- loader thread ---------------------------------------------------------------------------
    def _load_loop(self) -> None:
        while not self._stop.wait(self.cfg.reload_s):
            try:
                self.reconcile()
            except Exception:
                log.exception("registry check failed")

    def reconcile(self) -> None:
        """Load what the registry wants where it differs from what is loaded (loader thread)."""
        # the state's revision (an operator's choice) and the versions on disk (a new release
        # dropped into the folder becomes the default): either change means look again
        rev = (self.registry.revision(), tuple(self.registry.on_disk(n) for n in self.names))
        if rev == self._revision:
            return
        self._revision = rev
        for name in self.names:
            self._reconcile_one(name)
        self.rt.set_problems([f"{n}: nothing serves it: {e}" for n, e in self._problems.items() if e])

    def _load(self, name: str, version: str) -> LoadedModel:
        return load_model(
            self.registry,
            name,
            version,
            self.cfg.backend,
            engine_dir=self.engine_dir,
            max_batch=self.cfg.max_batch,
        )

    def _reconcile_one(self, name: str) -> None:
        state = self.registry.state(name)
        active, shadow = self._loaded.get(name, (None, None))
        errors: list[str] = []
        want = state.active
        if want is not None and (active is None or active.manifest.version != want):
            new: LoadedModel | None
            try:
                new = self._load(name, want)
            except OutpostError as exc:
                errors.append(str(exc))
                self.metrics.counters["load_failures"] += 1
                if isinstance(exc, ModelLoadError):  # the version is bad, not the machine
                    self.registry.mark_bad(name, want, str(exc))
                log.error(
                    "model load failed; keeping the last good version"
                    if active is not None
                    else "model load failed; looking for another version that loads",
                    extra={
                        "model": name,
                        "version": want,
                        "error": str(exc),
                        "serving": active.ref if active else None,
                    },
                )
                new = self._fallback(name, exclude=want, errors=errors) if active is None else None
            if new is not None:
                log.info(
                    "model loaded",
                    extra={"model": new.ref, "backend": new.backend.name, "load_ms": round(new.load_ms, 1)},
                )
                if active is not None:
                    self.metrics.counters["swaps"] += 1
                active = new
        want_shadow = state.shadow
        if want_shadow is None or (active is not None and want_shadow == active.manifest.version):
            shadow = None
        elif shadow is None or shadow.manifest.version != want_shadow:
            try:
                new_shadow: LoadedModel | None = self._load(name, want_shadow)
            except OutpostError as exc:
                errors.append(f"shadow: {exc}")
                self.metrics.counters["load_failures"] += 1
                if isinstance(exc, ModelLoadError):
                    self.registry.mark_bad(name, want_shadow, str(exc))
                log.error("shadow model load failed", extra={"model": name, "error": str(exc)})
                new_shadow = None
            shadow = new_shadow
        self._loaded[name] = (active, shadow)
        error = "; ".join(dict.fromkeys(errors))  # a backend that cannot run fails every version alike
        trigger = None
        self._problems[name] = (error or "no version loads") if active is None else ""
        if active is None:
            log.error("nothing serves this model", extra={"model": name, "error": error})
            with contextlib.suppress(OutpostError):
                trigger = self.registry.manifest(name, want).trigger if want else None
        self.bus.post(lambda: self._serve(name, active, shadow, error, trigger))

    def _fallback(self, name: str, *, exclude: str, errors: list[str]) -> LoadedModel | None:
        """Nothing serves ``name`` and its chosen version failed: the newest version that loads."""
        for version in reversed(self.registry.versions(name)):
            if version == exclude or self.registry.is_bad(name, version):
                continue
            try:
                lm = self._load(name, version)
            except OutpostError as exc:
                errors.append(str(exc))
                if isinstance(exc, ModelLoadError):
                    self.registry.mark_bad(name, version, str(exc))
                continue
            log.warning("serving a fallback version", extra={"model": lm.ref, "wanted": exclude})
            return lm
        return None

    # --- network thread --------------------------------------------------------------------------
    def _serve(
        self,
        name: str,
        active: LoadedModel | None,
        shadow: LoadedModel | None,
        error: str,
        trigger: Trigger | None = None,
    ) -> None:
        s = self.served[name]
        before = [m for m in (s.active, s.shadow) if m is not None]
        s.active, s.shadow, s.error, s.trigger = active, shadow, error, trigger
        for old in before:
            if old is not active and old is not shadow:
                # the requests that name it are scored by it, then it is closed
                self._score(old, self.batcher.take(old))
                old.close()
        loaded = [m.manifest for m in (active, shadow) if m is not None]
        s.metrics = tuple(dict.fromkeys(metric for m in loaded for metric in m.metrics))
        s.window = max((m.window for m in loaded), default=1)
        size = max(
            (m.manifest.window for sv in self.served.values() for m in (sv.active, sv.shadow) if m), default=1
        )
        self.windows.resize(size)
        self._report()

    def _on_events(self, msg: Inbound[EventDict]) -> None:
        """The events of one message that fit the contract: windows fed, a request queued for each
        model whose trigger matches (each holds the message until its score is confirmed)."""
        c = self.metrics.counters
        device = msg.key
        windows = self.windows
        served = self.served
        batch = msg.batch
        for index, ev in msg.items:
            if ev["device"] != device:
                detail = f"event device {ev['device'][:64]!r} != topic device {device!r}"
                self.rt.reject(msg, Reject("device_mismatch", detail, index if batch else None, ev))
                continue
            c["events"] += 1
            eid = ev["id"]
            if self._seen(device, eid):
                c["duplicates"] += 1
                continue
            metric = ev["metric"]
            windows.add(device, metric, float(ev["value"]))
            for name, s in served.items():
                active = s.active
                if active is None:
                    if s.trigger is None or s.trigger.matches(device, metric):
                        c[f"unscored_no_model.{name}"] += 1  # the status says why (error)
                    continue
                if not active.manifest.trigger.matches(device, metric):
                    continue
                self._request(name, s, active, ev, device, msg.turn)

    def _request(
        self,
        name: str,
        s: _Served,
        active: LoadedModel,
        ev: EventDict,
        device: str,
        turn: Turn,
    ) -> None:
        c = self.metrics.counters
        try:
            snap = snapshot(s.metrics, s.window, active.manifest.min_readings, self.windows, device)
        except FeatureError:
            c[f"warming.{name}"] += 1
            return
        req = Request(
            active,
            s.shadow,
            snap,
            device,
            ev["id"],
            ev.get("trace") or ev["id"],
            ev["ts"],
            ev.get("ingest_ns") or ev["ts"],
            time.perf_counter_ns(),
            turn,
        )
        c["requests"] += 1
        self.rt.hold(turn)
        full = self.batcher.add(active, req, req.enq_ns)
        if full is not None:
            c["full_batches"] += 1
            self._score(active, full)
        else:
            self._wake_when_due()

    def _seen(self, device: str, eid: str) -> bool:
        entry = self._recent.get(device)
        if entry is None:
            entry = self._recent[device] = (set(), deque())
        ids, order = entry
        if eid in ids:
            return True
        ids.add(eid)
        order.append(eid)
        if len(order) > RECENT_IDS:
            ids.discard(order.popleft())
        return False

    def _publish(self, results: list[_Result]) -> None:
        """Publish one batch's scores, a JSON list per (model, device) (network thread)."""
        groups: dict[str, list[_Result]] = {}
        root = self.inference_root
        for r in results:
            groups.setdefault(f"{root}{r.request.model.manifest.name}/{r.request.device}", []).append(r)
        qos = self.cfg.qos
        now = time.time_ns()
        e2s = self._e2s
        release = self.rt.release
        for topic, rs in groups.items():
            body = []
            for r in rs:
                req = r.request
                m = req.model.manifest
                body.append(
                    {
                        "v": SCHEMA_VERSION,
                        "id": score_id(m.name, req.event_id),
                        "ts": req.event_ts,
                        "trace": req.trace,
                        "event": req.event_id,
                        "device": req.device,
                        "model": m.name,
                        "version": r.version,
                        "backend": req.model.backend.name,
                        "score": r.score,
                        "label": r.label,
                        "confidence": r.confidence,
                        "alert": r.alert,
                        "queue_ms": r.queue_ms,
                        "compute_ms": r.compute_ms,
                        "batch": r.batch,
                        "ingest_ns": req.origin_ns,
                    }
                )
                e2s.record_ns(now - req.origin_ns)
            turns = [r.request.turn for r in rs]
            self.rt.publish(topic, orjson.dumps(body), qos=qos, for_=turns)
            for turn in turns:  # the publish holds them now, until the broker confirms it
                release(turn)
        self.metrics.counters["scored"] += len(results)

    # --- scoring (network thread) ----------------------------------------------------------------
    def _wake_when_due(self) -> None:
        """Ask the bus to wake the thread when the oldest partial batch has waited ``max_wait_ms``
        (no polling: a fixed sub-millisecond tick cost an idle inference ~9% of a core)."""
        due_ns = self.batcher.next_due_ns()
        if due_ns is not None:
            self._due.at(due_ns)

    def _score_due(self) -> None:
        for lm, reqs in self.batcher.due(time.perf_counter_ns()):
            self._score(lm, reqs)
        self._wake_when_due()

    def _score(self, lm: LoadedModel, all_reqs: list[Request]) -> None:
        """One session call for a batch of one model version, its scores published, then the
        shadow model on the same rows."""
        if not all_reqs:
            return
        c = self.metrics.counters
        m = lm.manifest
        x, problems = feature_matrix(m, [r.snap for r in all_reqs])
        reqs = all_reqs
        if any(problems):
            for r, p in zip(all_reqs, problems, strict=True):
                if p is not None:
                    self._fail([r], "bad_features", f"{lm.ref}: {r.device}: {p}")
            keep = [i for i, p in enumerate(problems) if p is None]
            reqs, x = [all_reqs[i] for i in keep], x[keep]
            if not reqs:
                return
        start = time.perf_counter_ns()
        cpu_start = time.thread_time_ns()
        try:
            probs = lm.probabilities(x)
        except Exception as exc:
            log.exception("model call failed", extra={"model": lm.ref})
            self._fail(reqs, "model_error", f"{lm.ref}: {exc}")
            return
        compute_ns = time.perf_counter_ns() - start
        c["batches"] += 1
        c["rows"] += len(reqs)
        c["compute_ns"] += compute_ns
        # CPU time of the call on this thread (ORT runs one intra-op thread: the caller): the
        # model's own cost, without the wait for a core that another process holds.
        c["compute_cpu_ns"] += time.thread_time_ns() - cpu_start
        self._compute.record_ns(compute_ns)
        self._infer_histogram(lm).record_ns(compute_ns, len(reqs))
        self._queue_wait.record_ns(start - reqs[0].enq_ns)  # the batch's longest wait
        compute_ms = round(compute_ns / 1e6, 4)
        labels = m.labels
        normal = m.normal_index
        threshold = m.threshold
        best = probs.argmax(axis=1)
        results: list[_Result] = []
        for i, r in enumerate(reqs):
            row = probs[i]
            k = int(best[i])
            score = float(1.0 - row[normal])
            if not math.isfinite(score):
                self._fail([r], "model_error", f"{lm.ref}: non-finite output")
                continue
            results.append(
                _Result(
                    r,
                    m.version,
                    round(score, 6),
                    labels[k],
                    round(float(row[k]), 6),
                    score >= threshold,
                    round((start - r.enq_ns) / 1e6, 4),
                    compute_ms,
                    len(reqs),
                )
            )
        self._publish(results)
        picked = [i for i, r in enumerate(reqs) if r.shadow is not None]
        if picked:
            self._run_shadow(lm, [reqs[i] for i in picked], best[picked])

    def _infer_histogram(self, lm: LoadedModel) -> Histogram:
        """``infer.{model}.{version}``: each scored row's compute time, i.e. its batch's session
        call (the ``compute_ms`` its score carries), recorded once per row so its quantiles are per
        request, not per batch (the telemetry's inference latency per model and version). A model
        name has no dot, so the name splits at the first two."""
        h = self._infer.get(lm.ref)
        if h is None:
            m = lm.manifest
            h = self._infer[lm.ref] = self.metrics.histogram(f"infer.{m.name}.{m.version}")
        return h

    def _run_shadow(
        self, active: LoadedModel, reqs: list[Request], active_best: np.ndarray[Any, Any]
    ) -> None:
        """Score the same requests with the shadow model: agreement and latency go to metrics,
        the scores themselves go nowhere (a candidate is never acted on)."""
        c = self.metrics.counters
        name = active.manifest.name
        by_shadow: dict[LoadedModel, list[Request]] = {}
        for r in reqs:
            assert r.shadow is not None
            by_shadow.setdefault(r.shadow, []).append(r)
        position = {id(r): i for i, r in enumerate(reqs)}
        for sm, candidates in by_shadow.items():
            sman = sm.manifest
            rs = [
                r
                for r in candidates
                if all(len(r.snap.get(k, ())) >= sman.min_readings for k in sman.metrics)
            ]
            if not rs:
                continue
            x, problems = feature_matrix(sman, [r.snap for r in rs])
            if any(problems):
                keep = [i for i, p in enumerate(problems) if p is None]
                rs, x = [rs[i] for i in keep], x[keep]
                if not rs:
                    continue
            try:
                start = time.perf_counter_ns()
                sp = sm.probabilities(x)
                self._shadow_compute.record_ns(time.perf_counter_ns() - start)
            except Exception:
                c[f"shadow_errors.{name}"] += 1
                log.exception("shadow call failed", extra={"model": sm.ref})
                continue
            mine = active_best[[position[id(r)] for r in rs]]
            agree = int(np.sum(sp.argmax(axis=1) == mine))
            c[f"shadow_rows.{name}"] += len(rs)
            c[f"shadow_agree.{name}"] += agree

    def _fail(self, reqs: list[Request], reason: str, detail: str) -> None:
        """Requests that cannot be scored: dead-lettered with the windows they would have been
        scored on (network thread)."""
        for r in reqs:
            payload = orjson.dumps({"event": r.event_id, "device": r.device, "windows": r.snap})
            self.rt.dead_letter(
                reason, detail, self.topics.events(r.device), payload, trace=r.trace, for_=r.turn
            )
            self.rt.release(r.turn)

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.reconcile()  # the first models load before any event is taken...
        self.bus.run_posted()  # ...and serve before the bus (not yet running) delivers one
        restored = self.window_store.load(self.windows)
        self._loader.start()
        self.rt.start()
        log.info(
            "inference started",
            extra={"models": self.names, "qos": self.cfg.qos, "windows_restored": restored},
        )

    def stop(self) -> None:
        """Drain: stop intake, score what waits, wait for confirmations, go offline."""
        self._stop.set()
        self._loader.join(timeout=5)  # a model the loader handed over is served (or closed) in the drain
        self.rt.stop(self._score_all)
        self._checkpoint()
        self.window_store.close()
        for lm in {id(m): m for s in self.served.values() for m in (s.active, s.shadow) if m}.values():
            lm.close()
        self.registry.close()
        log.info("inference stopped", extra={"counters": dict(self.metrics.counters)})

    def _checkpoint(self) -> None:
        n = self.window_store.save(self.windows)
        if n:
            self.metrics.counters["window_checkpoints"] += 1

    def _score_all(self) -> None:
        for lm, reqs in self.batcher.drain():
            self._score(lm, reqs)


def run(settings: OutpostSettings, stop: threading.Event) -> InferenceService:
    """Run inference until ``stop`` is set; returns the (stopped) service for inspection."""
    return run_until(InferenceService(settings), stop)


def main() -> None:
    service_main(InferenceService, OutpostSettings)
