"""What every service shares: one bus connection, a retained status with a last will, periodic
metrics, and a clean stop on SIGTERM/SIGINT (drain, flush, checkpoint, status ``offline``).

A service module provides a ``run(settings, stop)`` function that tests call directly, and a thin
``__main__`` that calls :func:`main`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, Protocol, TypeVar

import orjson

from outpost import __version__
from outpost.bus import Bus, Will
from outpost.envelope import SCHEMA_VERSION, dead_letter, new_id, now_ns
from outpost.errors import OutpostError
from outpost.log import get_logger
from outpost.metrics import Metrics
from outpost.settings import OutpostSettings

log = get_logger("outpost.service")


class ServiceRuntime:
    """The bus, status and metrics of one service process."""

    def __init__(
        self,
        name: str,
        settings: OutpostSettings,
        *,
        durable: bool = False,
        manual_ack: bool = False,
        receive_maximum: int = 1000,
        tick_s: float = 0.05,
        mqtt5: bool = True,
    ) -> None:
        """``tick_s`` bounds how late a timer can run when no message arrives (the network thread
        waits that long in select): services with millisecond flush timers pass a small one."""
        self.name = name
        self.settings = settings
        self.topics = settings.topics
        self.metrics = Metrics(name)
        self.started_ns = now_ns()
        self.status_topic = self.topics.service_status(name)
        self.dlq_topic = self.topics.dlq(name)
        client_id = f"{settings.prefix}-{settings.site}-{name}"
        self.bus = Bus(
            settings.mqtt,
            client_id=client_id,
            durable=durable,
            manual_ack=manual_ack,
            will=Will(self.status_topic, self._status("offline", clean=False)),
            receive_maximum=receive_maximum,
            tick_s=tick_s,
            mqtt5=mqtt5,
        )
        self.extra_status: Callable[[], dict[str, Any]] | None = None
        self._problems: tuple[str, ...] = ()
        self.bus.on_connect(self._announce)
        self.bus.every(settings.telemetry.metrics_interval_s, self.publish_metrics)

    def _status(self, state: str, *, clean: bool = True) -> bytes:
        body: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "id": new_id(),
            "ts": now_ns(),
            "trace": "",
            "service": self.name,
            "state": state,
            "version": __version__,
            "config_hash": self.settings.config_hash(),
            "pid": os.getpid(),
            "started_ns": self.started_ns,
        }
        if not clean:
            body["reason"] = "connection lost"
        elif state == "online":
            body["health"] = "degraded" if self._problems else "ok"
            body["problems"] = list(self._problems)
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
            self.bus.publish(self.status_topic, self._status("online"), qos=1, retain=True)

    def _announce(self, _session_present: bool) -> None:
        self.bus.publish(self.status_topic, self._status("online"), qos=1, retain=True)

    def publish_metrics(self) -> None:
        snap = self.metrics.snapshot()
        snap.update({"v": SCHEMA_VERSION, "id": new_id(), "ts": now_ns(), "trace": ""})
        snap["counters"]["bus_connects"] = self.bus.connects
        snap["counters"]["bus_dropped_qos0"] = self.bus.dropped_qos0
        snap["counters"]["bus_handler_errors"] = self.bus.handler_errors
        if self.extra_status is not None:
            snap["state"] = self.extra_status()
        self.bus.publish(self.topics.metrics(self.name), orjson.dumps(snap), qos=0)

    def dead_letter(
        self,
        reason: str,
        detail: str,
        topic: str,
        payload: bytes,
        *,
        trace: str | None = None,
        index: int | None = None,
        qos: int = 1,
    ) -> int:
        """Count a rejection (``rejected`` and ``rejected.{reason}``) and publish its dead letter
        on ``.../dlq/{service}``; the publish's message id, for services that wait for it."""
        c = self.metrics.counters
        c["rejected"] += 1
        c["rejected." + reason] += 1
        entry = dead_letter(
            stage=self.name,
            reason=reason,
            detail=detail,
            topic=topic,
            payload=payload,
            trace=trace,
            index=index,
        )
        return self.bus.publish(self.dlq_topic, entry, qos=qos)

    def start(self, wait_s: float | None = 30.0) -> None:
        """Connect; ``wait_s`` None: return at once and keep trying in the background."""
        self.bus.start(wait_s=wait_s)

    def stop(self, drain_s: float = 5.0) -> None:
        if self.bus.connected:  # offline, there is no one to tell (and no QoS 0 publish to drop)
            self.publish_metrics()
        self.bus.stop(drain_s=drain_s, final=[(self.status_topic, self._status("stopped"), True)])


def install_stop_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` (only possible from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("stop requested", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def wait(stop: threading.Event, tick_s: float = 0.5) -> None:
    """Block until ``stop`` is set, waking regularly so signals are handled promptly."""
    while not stop.wait(tick_s):
        pass


class Runnable(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


S = TypeVar("S", bound=Runnable)


def run_until(svc: S, stop: threading.Event) -> S:
    """Start ``svc``, wait for ``stop``, stop it (drain, flush, checkpoint) and return it: every
    service's ``run(settings, stop)``, which tests call in-process."""
    svc.start()
    wait(stop, 0.2)
    svc.stop()
    return svc


def service_main(make: Callable[[OutpostSettings], Runnable]) -> None:
    """Every service's ``__main__``: settings from the environment and the site file, logging,
    SIGTERM/SIGINT for a clean stop, then run until stopped."""
    from outpost.log import setup_logging
    from outpost.settings import load_settings

    try:
        settings = load_settings()
        setup_logging(settings.log_level, json=settings.log_json)
        stop = threading.Event()
        install_stop_signals(stop)
        run_until(make(settings), stop)
    except OutpostError as exc:  # a bad setting, a broker that never answered, unusable state
        log.error("cannot run", extra={"error": str(exc)})
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
