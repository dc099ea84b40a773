"""Per-device sequence tracking: new, gap, late, duplicate, stale, reset."""

from __future__ import annotations

from outpost.services.ingest.seqtrack import Seen, SeqState, observe

W = 64


def feed(seqs: list[tuple[int, int]], window: int = W) -> tuple[list[tuple[Seen, int]], SeqState | None]:
    state: SeqState | None = None
    out = []
    for seq, ts in seqs:
        outcome, gap, new = observe(state, seq, ts, window)
        out.append((outcome, gap))
        state = new
    return out, state


def test_first_reading_is_new() -> None:
    outcome, gap, state = observe(None, 5, 100, W)
    assert (outcome, gap) == (Seen.NEW, 0)
    assert state == SeqState(5, 100, 1)


def test_in_order_is_new_without_gap() -> None:
    out, state = feed([(i, i) for i in range(10)])
    assert out == [(Seen.NEW, 0)] * 10
    assert state is not None
    assert state.last == 9
    assert state.mask == (1 << 10) - 1


def test_gap() -> None:
    out, _ = feed([(1, 1), (2, 2), (6, 6)])
    assert out[-1] == (Seen.NEW, 3)


def test_late_inside_window_is_accepted_once() -> None:
    out, state = feed([(1, 1), (2, 2), (5, 5), (3, 3), (4, 4)])
    assert out == [(Seen.NEW, 0), (Seen.NEW, 0), (Seen.NEW, 2), (Seen.LATE, 0), (Seen.LATE, 0)]
    assert state is not None
    assert state.last == 5  # a late reading does not move the newest seq
    assert state.last_ts == 5
    outcome, _, _ = observe(state, 3, 3, W)
    assert outcome is Seen.DUPLICATE


def test_duplicate_of_newest_and_of_older() -> None:
    out, _ = feed([(1, 1), (2, 2), (2, 2), (1, 1)])
    assert [o for o, _ in out] == [Seen.NEW, Seen.NEW, Seen.DUPLICATE, Seen.DUPLICATE]


def test_duplicate_leaves_state_alone() -> None:
    _, state = feed([(1, 1), (2, 2)])
    assert state is not None
    before = SeqState(state.last, state.last_ts, state.mask)
    outcome, _, after = observe(state, 1, 1, W)
    assert outcome is Seen.DUPLICATE
    assert after == before
    assert state == before  # observe never mutates its input


def test_stale_beyond_window_with_older_ts() -> None:
    out, _ = feed([(1, 1), (1 + W, 100), (1, 1)])
    assert [o for o, _ in out] == [Seen.NEW, Seen.NEW, Seen.STALE]


def test_last_seq_inside_window_is_still_tracked() -> None:
    # seq (last - W + 1) is the oldest the window remembers
    out, _ = feed([(1, 1), (W, W), (1, 1)])
    assert out[-1][0] is Seen.DUPLICATE
    out, _ = feed([(2, 2), (W, W), (1, 1)])
    assert out[-1][0] is Seen.LATE


def test_jump_beyond_window_forgets_the_old_mask() -> None:
    out, state = feed([(1, 1), (2, 2), (1000, 1000)])
    assert out[-1] == (Seen.NEW, 997)
    assert state is not None
    assert state.mask == 1


def test_reset_far_below_window_with_newer_ts() -> None:
    out, state = feed([(i, i) for i in range(200)] + [(0, 1000)])
    assert out[-1][0] is Seen.RESET
    assert state == SeqState(0, 1000, 1, epoch=1)  # a new counter epoch: new ids
    # the device counts on from its new start
    outcome, gap, _ = observe(state, 1, 1001, W)
    assert (outcome, gap) == (Seen.NEW, 0)


def test_repeat_inside_window_with_newer_ts_is_duplicate() -> None:
    """Inside the window a seen seq is a duplicate whatever its timestamp: a (device, seq) must never
    come out twice. (A device that restarts its counter before the window is full therefore has its
    first readings after the restart dead-lettered, until its seq passes the old one.)"""
    out, _ = feed([(i, 100 + i) for i in range(10)] + [(0, 500), (9, 501)])
    assert [o for o, _ in out[-2:]] == [Seen.DUPLICATE, Seen.DUPLICATE]


def test_replay_inside_window_with_original_ts_is_duplicate() -> None:
    out, _ = feed([(i, 100 + i) for i in range(10)] + [(3, 103), (9, 109)])
    assert [o for o, _ in out[-2:]] == [Seen.DUPLICATE, Seen.DUPLICATE]


def test_window_mask_is_bounded() -> None:
    _, state = feed([(i, i) for i in range(0, 10 * W, 3)])
    assert state is not None
    assert state.mask < (1 << W)


def test_a_counter_restart_starts_a_new_epoch_that_later_readings_keep() -> None:
    state = SeqState(last=5000, last_ts=100, mask=1, epoch=2)
    outcome, _, reset = observe(state, 0, 200, 64)
    assert outcome is Seen.RESET and reset.epoch == 3
    outcome, _, nxt = observe(reset, 1, 201, 64)
    assert outcome is Seen.NEW and nxt.epoch == 3
