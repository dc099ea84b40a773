"""Per-device sequence tracking: duplicates, gaps, late arrivals and device restarts.

Each device keeps its highest seq, that reading's timestamp, and a bitmask of which of the last
``window`` seqs were seen. Pure logic: the service persists the state (see ``dedup_store``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Seen(Enum):
    NEW = "new"  # the next seq, or a jump forward (gap > 0)
    LATE = "late"  # older than the newest, inside the window, not seen before
    DUPLICATE = "duplicate"  # seen before
    STALE = "stale"  # older than the window and not newer in time: cannot prove it is new
    RESET = "reset"  # far older seq with a newer timestamp: the device restarted its counter


@dataclass(slots=True)
class SeqState:
    last: int
    last_ts: int
    mask: int  # bit i set: seq (last - i) was seen
    epoch: int = 0  # counter restarts seen; part of the reading id so reused seqs get new ids


def observe(state: SeqState | None, seq: int, ts: int, window: int) -> tuple[Seen, int, SeqState]:
    """Classify ``seq`` and return (outcome, gap, new state). ``state`` is not modified."""
    if state is None:
        return Seen.NEW, 0, SeqState(seq, ts, 1)
    last = state.last
    if seq > last:
        shift = seq - last
        mask = 1 if shift >= window else ((state.mask << shift) | 1) & ((1 << window) - 1)
        return Seen.NEW, shift - 1, SeqState(seq, max(ts, state.last_ts), mask, state.epoch)
    age = last - seq
    if age < window:
        bit = 1 << age
        if state.mask & bit:
            return Seen.DUPLICATE, 0, state
        return Seen.LATE, 0, SeqState(last, state.last_ts, state.mask | bit, state.epoch)
    if ts > state.last_ts:
        return Seen.RESET, 0, SeqState(seq, ts, 1, state.epoch + 1)
    return Seen.STALE, 0, state
