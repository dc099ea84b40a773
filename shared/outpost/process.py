"""Child processes that end with their parent: what the supervisor, the zygote, the broker and the
time-series server each need of the processes they start.

``die_with_parent`` runs in a child between fork and exec (or right after a fork): the kernel then
sends it SIGTERM when the thread that forked it ends (PR_SET_PDEATHSIG), even when the parent is
killed with kill -9. ``end_process`` stops one politely, then for good.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(parent: int) -> Callable[[], None]:
    """Run in the child between fork and exec: SIGTERM when the process that forked it dies.

    The kernel sends it when the *thread* that forked exits, not the process: the callers fork from
    threads that live as long as what they start (docs/operations.md). The parent may have died
    before the call (then the child is the init's already): it exits at once."""

    def setup() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return setup


def end_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM (a server saves what it holds and exits), then SIGKILL if it has not within
    ``timeout_s``; reaped either way. Nothing to do for one that has exited."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
