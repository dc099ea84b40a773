"""Device churn: when a device drops its connection abruptly and how long it stays away.

Real fleets lose devices to Wi-Fi dropouts, brown-outs and watchdog resets; each drop must fire the
device's retained last will (``.../status`` = offline) and each return must publish ``online``.
Drops are a Poisson process per device (``rate_per_min`` on average), so they do not arrive in
lock-step. Churn follows the wall clock, not the seed: it changes when readings are sent, never
what they contain.
"""

from __future__ import annotations

import math
import random


class Churn:
    """Draws drop times and offline durations for one publisher process's devices."""

    def __init__(
        self,
        rng: random.Random,
        rate_per_min: float,
        *,
        offline_s: tuple[float, float] = (0.2, 2.0),
    ) -> None:
        if rate_per_min < 0:
            raise ValueError("churn rate must be >= 0")
        lo, hi = offline_s
        if not 0 <= lo <= hi:
            raise ValueError("offline range must satisfy 0 <= low <= high")
        self.rng = rng
        self.rate_per_s = rate_per_min / 60.0
        self.offline_s = offline_s

    def next_drop_in(self) -> float:
        """Seconds from now until the device's next drop (infinity when churn is off)."""
        if self.rate_per_s <= 0:
            return math.inf
        return self.rng.expovariate(self.rate_per_s)

    def offline_for(self) -> float:
        """Seconds the device stays disconnected after a drop."""
        return self.rng.uniform(*self.offline_s)
