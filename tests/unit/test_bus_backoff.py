"""The bus's reconnect delays: full-jitter exponential backoff, capped, never below half the minimum."""

from __future__ import annotations

import itertools
import random

from outpost.backoff import backoff_delays
from outpost.bus import _filter_of


def test_backoff_grows_and_is_capped() -> None:
    delays = list(itertools.islice(backoff_delays(0.2, 15.0, random.Random(1)), 200))
    assert all(0.1 <= d <= 15.0 for d in delays)
    # the cap for attempt n is min(15, 0.2 * 2**n): early delays are small, late ones can be large
    assert max(delays[:3]) <= 0.8
    assert max(delays[50:]) > 5.0


def test_backoff_is_jittered() -> None:
    a = list(itertools.islice(backoff_delays(0.2, 15.0, random.Random(1)), 20))
    b = list(itertools.islice(backoff_delays(0.2, 15.0, random.Random(2)), 20))
    assert a != b
    assert len(set(a)) > 10


def test_filter_of_shared_subscription() -> None:
    assert _filter_of("$share/g1/outpost/v1/s/dev/+/telemetry") == "outpost/v1/s/dev/+/telemetry"
    assert _filter_of("outpost/v1/s/events/+") == "outpost/v1/s/events/+"
