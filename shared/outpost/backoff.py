"""Retry delays: capped exponential backoff with full jitter (the bus's reconnects; anything that
retries a peer that may be down, so a fleet that lost it does not come back in lock-step)."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delay(attempt: int, low: float, high: float, rng: random.Random | None = None) -> float:
    """The delay before try ``attempt + 1`` (0: the first retry): full-jitter exponential backoff,
    uniform(0, min(high, low * 2**attempt)), never below low/2."""
    cap = min(high, low * (2 ** min(max(attempt, 0), 30)))
    return max(low / 2, (rng or random).uniform(0, cap))


def backoff_delays(low: float, high: float, rng: random.Random | None = None) -> Iterator[float]:
    """:func:`backoff_delay` for attempt 0, 1, 2, ... (a reconnect loop's delays)."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        yield backoff_delay(attempt, low, high, rng)
        attempt += 1
