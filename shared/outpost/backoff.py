"""Retry delays: capped exponential backoff with full jitter (the bus's reconnects; anything that
retries a peer that may be down, so a fleet that lost it does not come back in lock-step)."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delays(low: float, high: float, rng: random.Random | None = None) -> Iterator[float]:
    """Full-jitter exponential backoff: uniform(0, min(high, low * 2**n)), never below low/2."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        cap = min(high, low * (2**attempt))
        yield max(low / 2, rng.uniform(0, cap))
        attempt = min(attempt + 1, 30)
