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
    messages_from: float = 0.0
    messages: int = 0


class RateLimiter:
    """``take(device, n, now)`` grants up to n readings. A device whose rejections within one second
    reach ``quarantine_after``, or (``admit``) that sends more than ``quarantine_messages``
    messages within one second, is quarantined for ``quarantine_s``: everything it sends is refused
    without parsing, which keeps a flooding device from starving the others.

    Why a message count beside the readings' bucket: a flood of one-reading messages costs the
    service per message (reading, decoding), and the readings' burst (20,000 by default, so that a
    device can send its backlog after an outage) let a flooder's first ~22,000 messages through
    the whole path before the quarantine began (docs/benchmarks.md, "Overload (issue 14)"). A
    backlog sent in batches is a few messages and stays within the message count."""

    def __init__(
        self,
        rate: float,
        burst: float,
        quarantine_after: int,
        quarantine_s: float,
        quarantine_messages: int = 0,
    ) -> None:
        """``quarantine_messages`` 0: no limit on messages (only on readings)."""
        self.rate = rate
        self.burst = burst
        self.quarantine_after = quarantine_after
        self.quarantine_s = quarantine_s
        self.quarantine_messages = quarantine_messages
        self._buckets: dict[str, _Bucket] = {}
        self.quarantines = 0

    def quarantined(self, device: str, now: float) -> bool:
        b = self._buckets.get(device)
        return b is not None and now < b.quarantined_until

    def admit(self, device: str, now: float) -> bool:
        """Count one message of ``device``: False when the device is quarantined, already or from
        this message on (it is past ``quarantine_messages`` within one second)."""
        b = self._buckets.get(device)
        if b is None:
            b = self._buckets[device] = _Bucket(self.burst, now, now, messages_from=now)
        elif now < b.quarantined_until:
            return False
        limit = self.quarantine_messages
        if not limit:
            return True
        if now - b.messages_from >= 1.0:
            b.messages_from = now
            b.messages = 0
        b.messages += 1
        if b.messages <= limit:
            return True
        b.quarantined_until = now + self.quarantine_s
        b.messages = 0
        b.rejected_in_window = 0
        self.quarantines += 1
        return False

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

    def wait_s(self, device: str, n: int, now: float) -> float:
        """Seconds until ``n`` tokens of ``device`` are there (0: now): a caller refused a token
        sleeps that long rather than polling. More than the burst never fits: infinite."""
        if n > self.burst:
            return float("inf")
        b = self._buckets.get(device)
        if b is None:
            return 0.0
        tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
        if tokens >= n:
            return 0.0
        return (n - tokens) / self.rate if self.rate > 0 else float("inf")

    def give_back(self, device: str, n: int) -> None:
        """Return ``n`` tokens taken but not used (the connector gateway takes a capability's token,
        then its connector's: when the second is refused, the first goes back)."""
        b = self._buckets.get(device)
        if b is not None:
            b.tokens = min(self.burst, b.tokens + n)

    def quarantined_devices(self, now: float) -> list[str]:
        return sorted(d for d, b in self._buckets.items() if now < b.quarantined_until)
