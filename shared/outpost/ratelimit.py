"""Per-device token buckets with quarantine for devices that keep flooding."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    window_start: float = 0.0
    rejected_in_window: int = 0
    quarantined_until: float = 0.0


class RateLimiter:
    """``take(device, n, now)`` grants up to n readings. A device whose rejections within one second
    reach ``quarantine_after`` is quarantined for ``quarantine_s``: everything it sends is refused
    without parsing, which keeps a flooding device from starving the others."""

    def __init__(self, rate: float, burst: float, quarantine_after: int, quarantine_s: float) -> None:
        self.rate = rate
        self.burst = burst
        self.quarantine_after = quarantine_after
        self.quarantine_s = quarantine_s
        self._buckets: dict[str, _Bucket] = {}
        self.quarantines = 0

    def quarantined(self, device: str, now: float) -> bool:
        b = self._buckets.get(device)
        return b is not None and now < b.quarantined_until

    def take(self, device: str, n: int, now: float) -> int:
        b = self._buckets.get(device)
        if b is None:
            b = self._buckets[device] = _Bucket(self.burst, now, now)
        else:
            b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
            b.at = now
        granted = min(n, int(b.tokens))
        b.tokens -= granted
        refused = n - granted
        if refused:
            if now - b.window_start >= 1.0:
                b.window_start = now
                b.rejected_in_window = 0
            b.rejected_in_window += refused
            if b.rejected_in_window >= self.quarantine_after:
                b.quarantined_until = now + self.quarantine_s
                b.rejected_in_window = 0
                self.quarantines += 1
        return granted

    def quarantined_devices(self, now: float) -> list[str]:
        return sorted(d for d, b in self._buckets.items() if now < b.quarantined_until)
