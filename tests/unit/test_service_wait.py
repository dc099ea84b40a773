"""outpost.service.wait: a service's main thread sleeps until SIGTERM/SIGINT instead of polling, and
still wakes at once when the signal comes (a real process, a real signal)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

from outpost.service import wait

CHILD = """
import sys, threading, time
from outpost.service import install_stop_signals, wait
stop = threading.Event()
install_stop_signals(stop)
print("waiting", flush=True)
started = time.monotonic()
wait(stop, poll_s=60.0)
print(f"stopped {time.monotonic() - started:.3f}", flush=True)
"""


def test_the_main_thread_wakes_at_the_signal_not_at_its_poll() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        p = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "waiting"
            time.sleep(0.2)
            p.send_signal(sig)
            # the poll is 60 s: returning well before it means the signal woke the wait
            out, _ = p.communicate(timeout=30)
        finally:
            p.kill()
        assert p.returncode == 0 and out.startswith("stopped"), (sig, out)


def test_off_the_main_thread_it_waits_for_the_event() -> None:
    stop = threading.Event()
    done = threading.Event()

    def waiter() -> None:
        wait(stop)
        done.set()

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    assert not done.wait(0.3)
    stop.set()
    assert done.wait(10)
