"""Ids seen lately, in a bounded memory: how a service tells a redelivered input (or a request
sent again) from a new one without a database query per message. The broker redelivers only what
was not acknowledged, a few thousand messages at most, so the newest ``capacity`` ids cover it;
a service fills it at start from its database, newest last, and adds what each commit wrote."""

from __future__ import annotations

from collections.abc import Iterable


class RecentIds:
    def __init__(self, capacity: int, ids: Iterable[str] = ()) -> None:
        """``ids``: oldest first (the oldest are forgotten first past ``capacity``)."""
        self.capacity = capacity
        self._ids: dict[str, None] = {}
        self.add_all(ids)

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add_all(self, ids: Iterable[str]) -> None:
        seen = self._ids
        for key in ids:
            seen[key] = None
        while len(seen) > self.capacity:
            del seen[next(iter(seen))]
