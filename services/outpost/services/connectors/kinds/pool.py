"""A small pool of connections for a kind whose library connection is not thread-safe (psycopg,
pika's BlockingConnection): a call takes an idle one or opens one, and gives it back when it went
well; one that failed is closed and dropped, so the next call opens a fresh one. The gateway's
``concurrency`` bounds how many are open at once."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

C = TypeVar("C")


class Pool(Generic[C]):
    def __init__(self, open_: Callable[[], C], close: Callable[[C], None]) -> None:
        self._open = open_
        self._close = close
        self._idle: list[C] = []
        self._lock = threading.Lock()
        self._closed = False

    def take(self) -> tuple[C, bool]:
        """A connection, and whether it was reused (it may have gone stale while idle)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._open(), False

    def give(self, conn: C) -> None:
        """Back to the idle list (closed instead once the pool is)."""
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        self.drop(conn)

    def drop(self, conn: C) -> None:
        with contextlib.suppress(Exception):  # a broken connection cannot be closed politely
            self._close(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            self.drop(conn)
