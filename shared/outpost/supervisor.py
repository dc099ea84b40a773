"""Run services as supervised child processes: restart with backoff, count restarts, stop cleanly.

A service that crashes is restarted after 0.5 s, then 1 s, 2 s, ... up to 30 s; a run that lasted a
minute resets the backoff. Stopping sends SIGTERM (the services drain and checkpoint) and SIGKILL
only to a child that has not exited within the grace period.

Which services is the caller's to say (name -> module run with ``python -m``): the core knows none;
``outpost up`` takes them from the service registry (:mod:`outpost.services.registry`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from outpost.log import get_logger

log = get_logger("outpost.supervisor")

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0


@dataclass
class Child:
    name: str
    module: str
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    next_start: float = 0.0
    backoff: float = BACKOFF_MIN_S
    log_path: Path | None = None

    @property
    def state(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            return "running"
        return "restarting" if self.next_start else "stopped"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started if self.pid else 0.0


@dataclass
class Supervisor:
    env: dict[str, str]
    log_dir: Path
    services: dict[str, str]
    """name -> module run with ``python -m``, started in this order."""
    children: dict[str, Child] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name, module in self.services.items():
            child = self.children[name] = Child(name, module, log_path=self.log_dir / f"{name}.log")
            self._spawn(child)
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def _spawn(self, child: Child) -> None:
        assert child.log_path is not None
        out = child.log_path.open("ab")
        child.proc = subprocess.Popen(
            [sys.executable, "-m", child.module],
            env={**os.environ, **self.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        child.started = time.monotonic()
        child.next_start = 0.0
        log.info("started", extra={"service": child.name, "pid": child.proc.pid})

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            for child in self.children.values():
                if child.proc is not None and child.proc.poll() is not None and not child.next_start:
                    child.last_exit = child.proc.returncode
                    if now - child.started > STABLE_AFTER_S:
                        child.backoff = BACKOFF_MIN_S
                    child.next_start = now + child.backoff
                    log.warning(
                        "service exited; restarting",
                        extra={"service": child.name, "code": child.last_exit, "in_s": child.backoff},
                    )
                    child.backoff = min(child.backoff * 2, BACKOFF_MAX_S)
                elif child.next_start and now >= child.next_start and not self._stop.is_set():
                    child.restarts += 1
                    self._spawn(child)

    def stop(self, grace_s: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for child in self.children.values():
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children.values():
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("service did not stop in time; killing", extra={"service": child.name})
                child.proc.kill()
                child.proc.wait()
            child.last_exit = child.proc.returncode
            child.next_start = 0.0

    def status(self) -> list[dict[str, object]]:
        return [
            {
                "service": c.name,
                "state": c.state,
                "pid": c.pid,
                "restarts": c.restarts,
                "uptime_s": round(c.uptime_s, 1),
                "last_exit": c.last_exit,
            }
            for c in self.children.values()
        ]
