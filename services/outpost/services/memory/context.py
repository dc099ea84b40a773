"""Short-term context: key/value per scope (a task or a device) with a time to live, purged when the
task completes or the TTL passes, in bounded memory.

It holds what an agent needs for the next few seconds or minutes (the last readings it looked at,
a conversation turn, a pending question) and nothing that must survive a restart: that is what the
log and checkpoints are for. Bounded twice: each value's size, and the number of entries overall;
past the latter the least recently used entry goes, and ``evicted`` counts it, so a runaway agent
cannot take the gateway's memory.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from outpost.errors import OutpostError
from outpost.topics import check_segment


class ContextError(OutpostError):
    """A request to short-term context is invalid (bad scope or key, value too big or not JSON)."""


@dataclass(slots=True)
class _Item:
    value: Any
    expires: float
    size: int


class ShortTermContext:
    """Thread-safe; ``clock`` is injectable so expiry is tested without sleeping."""

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        max_value_bytes: int = 64 * 1024,
        max_bytes: int = 64 * 1024 * 1024,
        default_ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or max_value_bytes < 1 or max_bytes < 1 or default_ttl_s <= 0:
            raise ValueError("max_entries, max_value_bytes, max_bytes and default_ttl_s must be positive")
        self.max_entries = max_entries
        self.max_value_bytes = max_value_bytes
        self.max_bytes = max_bytes
        """What the values may take in all (their JSON): past it the least recently used go, so
        100,000 entries of 64 KB never make 6 GB."""
        self.default_ttl_s = default_ttl_s
        self._clock = clock
        self._items: OrderedDict[tuple[str, str], _Item] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0
        self.expired = 0
        self.bytes = 0

    def put(self, scope: str, key: str, value: Any, *, ttl_s: float | None = None) -> None:
        check_segment(scope, "scope")
        if not isinstance(key, str) or not 0 < len(key) <= 256:
            raise ContextError("a key must be a string of 1 to 256 characters")
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        if not 0 < ttl <= 7 * 86400:
            raise ContextError(f"ttl_s must be in (0, 604800], got {ttl}")
        try:
            size = len(orjson.dumps(value))
        except TypeError as exc:
            raise ContextError(f"the value must be JSON: {exc}") from None
        if size > self.max_value_bytes:
            raise ContextError(f"the value is {size} bytes, more than {self.max_value_bytes}")
        with self._lock:
            k = (scope, key)
            old = self._items.pop(k, None)
            if old is not None:
                self.bytes -= old.size
            self._items[k] = _Item(value, self._clock() + ttl, size)
            self.bytes += size
            while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)  # least recently used
                self.bytes -= dropped.size
                self.evicted += 1

    def get(self, scope: str, key: str, default: Any = None) -> Any:
        with self._lock:
            k = (scope, key)
            item = self._items.get(k)
            if item is None:
                return default
            if item.expires <= self._clock():
                self._drop(k, item)
                self.expired += 1
                return default
            self._items.move_to_end(k)
            return item.value

    def scope(self, scope: str) -> dict[str, Any]:
        """Every live key of one scope."""
        now = self._clock()
        with self._lock:
            out = {}
            for (s, key), item in list(self._items.items()):
                if s != scope:
                    continue
                if item.expires <= now:
                    self._drop((s, key), item)
                    self.expired += 1
                else:
                    out[key] = item.value
            return out

    def scope_bytes(self, scope: str) -> int:
        """What :meth:`scope` would answer, in bytes of JSON values (what a request for it costs)."""
        now = self._clock()
        with self._lock:
            return sum(i.size for (s, _), i in self._items.items() if s == scope and i.expires > now)

    def complete(self, scope: str) -> int:
        """The task is done: forget everything of its scope; how many entries went."""
        with self._lock:
            keys = [k for k in self._items if k[0] == scope]
            for k in keys:
                self._drop(k, self._items[k])
            return len(keys)

    def sweep(self) -> int:
        """Drop every expired entry (run periodically); how many went."""
        now = self._clock()
        with self._lock:
            dead = [(k, item) for k, item in self._items.items() if item.expires <= now]
            for k, item in dead:
                self._drop(k, item)
            self.expired += len(dead)
            return len(dead)

    def _drop(self, k: tuple[str, str], item: _Item) -> None:
        del self._items[k]
        self.bytes -= item.size

    def __len__(self) -> int:
        return len(self._items)
