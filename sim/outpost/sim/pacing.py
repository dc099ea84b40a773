"""Rate control for one publisher process: interval pacing against a fixed start, never a spin.

Item ``k`` is due at ``start + k / rate``. The publisher sends while items are due and otherwise
sleeps (in ``select``, so the network is served meanwhile) until the next one is. Measuring from a
fixed start rather than from the last send means a late wake-up is caught up, not lost, so the
achieved rate converges on the one asked for. ``slack_s`` lets items due within the next
millisecond go now: sleeping for tens of microseconds costs more than it smooths.
"""

from __future__ import annotations


class Pacer:
    """Tells a sender how long to wait before its next item; rate 0 means never wait."""

    def __init__(self, rate: float, start: float, *, slack_s: float = 0.001) -> None:
        if rate < 0:
            raise ValueError("rate must be >= 0")
        self.rate = rate
        self.start = start
        self.slack_s = slack_s

    def wait_s(self, sent: int, now: float) -> float:
        """Seconds until item number ``sent`` (0-based) is due; 0.0 when it may go now."""
        if self.rate <= 0:
            return 0.0
        delay = self.start + sent / self.rate - now
        return delay if delay > self.slack_s else 0.0
