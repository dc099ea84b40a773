"""Per-device token buckets and quarantine."""

from __future__ import annotations

import pytest

from outpost.ratelimit import RateLimiter


def test_burst_then_refill() -> None:
    rl = RateLimiter(rate=10, burst=5, quarantine_after=1000, quarantine_s=30)
    assert rl.take("d", 3, 0.0) == 3
    assert rl.take("d", 3, 0.0) == 2
    assert rl.take("d", 1, 0.0) == 0
    assert rl.take("d", 1, 0.05) == 0  # half a token
    assert rl.take("d", 1, 0.1) == 1
    assert rl.take("d", 100, 10.0) == 5  # refill is capped at the burst


def test_devices_have_their_own_buckets() -> None:
    rl = RateLimiter(rate=1, burst=2, quarantine_after=1000, quarantine_s=30)
    assert rl.take("a", 10, 0.0) == 2
    assert rl.take("b", 2, 0.0) == 2


def test_quarantine_after_enough_refusals_in_a_second() -> None:
    rl = RateLimiter(rate=1, burst=2, quarantine_after=10, quarantine_s=30)
    assert rl.take("flood", 2, 0.0) == 2
    for i in range(9):
        assert rl.take("flood", 1, 0.01 * (i + 1)) == 0
    assert not rl.quarantined("flood", 0.1)
    assert rl.take("flood", 1, 0.1) == 0  # the 10th refusal within the second
    assert rl.quarantined("flood", 0.1)
    assert rl.quarantined("flood", 30.09)
    assert not rl.quarantined("flood", 30.2)
    assert rl.quarantines == 1
    assert rl.quarantined_devices(1.0) == ["flood"]
    assert rl.quarantined_devices(31.0) == []
    assert not rl.quarantined("other", 0.1)


def test_refusals_spread_out_do_not_quarantine() -> None:
    rl = RateLimiter(rate=1, burst=1, quarantine_after=5, quarantine_s=30)
    t = 0.0
    for _ in range(20):
        rl.take("slow", 2, t)  # one granted, one refused, every 1.5 s
        t += 1.5
    assert rl.quarantines == 0
    assert not rl.quarantined("slow", t)


def test_one_big_batch_over_the_limit_quarantines() -> None:
    rl = RateLimiter(rate=1, burst=10, quarantine_after=100, quarantine_s=5)
    assert rl.take("d", 500, 0.0) == 10
    assert rl.quarantined("d", 0.0)


def test_message_count_quarantines_past_its_limit_within_a_second() -> None:
    rl = RateLimiter(rate=1000, burst=20_000, quarantine_after=2000, quarantine_s=30, quarantine_messages=5)
    assert all(rl.admit("flood", 0.01 * i) for i in range(5))
    assert not rl.admit("flood", 0.05)  # the sixth within the second
    assert rl.quarantined("flood", 0.06)
    assert rl.quarantines == 1
    assert not rl.admit("flood", 29.0)  # quarantined: refused, and not counted again
    assert rl.quarantines == 1
    assert rl.admit("flood", 30.1)  # the quarantine is over; a new second


def test_message_count_starts_again_every_second() -> None:
    rl = RateLimiter(rate=1000, burst=20_000, quarantine_after=2000, quarantine_s=30, quarantine_messages=5)
    for second in range(10):
        assert all(rl.admit("steady", second + 0.1 * i) for i in range(5))
    assert not rl.quarantined("steady", 10.0)
    assert rl.admit("other", 0.0)  # devices are counted apart


def test_no_message_limit_by_default() -> None:
    rl = RateLimiter(rate=1, burst=2, quarantine_after=1000, quarantine_s=30)
    assert all(rl.admit("d", 0.0) for _ in range(100_000))
    assert rl.take("d", 3, 0.0) == 2  # the readings' bucket is the same one


def test_admit_refuses_a_device_quarantined_for_its_readings() -> None:
    rl = RateLimiter(rate=1, burst=1, quarantine_after=2, quarantine_s=30, quarantine_messages=100)
    assert rl.take("d", 3, 0.0) == 1
    assert rl.quarantined("d", 0.0)
    assert not rl.admit("d", 0.1)


def test_a_token_given_back_can_be_taken_again() -> None:
    rl = RateLimiter(rate=1, burst=2, quarantine_after=1000, quarantine_s=30)
    assert rl.take("cap", 2, 0.0) == 2
    assert rl.take("cap", 1, 0.0) == 0
    rl.give_back("cap", 1)
    assert rl.take("cap", 1, 0.0) == 1
    rl.give_back("cap", 5)  # never past the burst
    assert rl.take("cap", 5, 0.0) == 2
    rl.give_back("never-seen", 1)  # a bucket that took nothing has nothing to get back


def test_wait_s_is_how_long_until_the_tokens_are_there() -> None:
    rl = RateLimiter(10.0, 2.0, 1000, 1.0)
    assert rl.wait_s("d", 1, 0.0) == 0.0  # a new bucket starts full
    assert rl.take("d", 2, 0.0) == 2
    assert rl.wait_s("d", 1, 0.0) == pytest.approx(0.1)
    assert rl.wait_s("d", 1, 0.05) == pytest.approx(0.05)
    assert rl.wait_s("d", 2, 0.05) == pytest.approx(0.15)
    assert rl.wait_s("d", 1, 0.1) == 0.0
    assert rl.wait_s("d", 3, 0.0) == float("inf")  # more than the burst never fits
