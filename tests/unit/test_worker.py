"""Worker: blocking work on threads, outcomes back on the "network thread" (here: the test thread,
which drains what the fake ``post`` collected)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from outpost.worker import Worker


class Loop:
    """A fake ``Bus.post``: worker threads append, the test thread runs them (as the network thread
    would), so ``done`` and the worker's own bookkeeping run on the test thread only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._posted: list[Callable[[], None]] = []
        self.threads: set[str] = set()

    def post(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._posted.append(fn)

    def drain(self) -> int:
        with self._lock:
            posted, self._posted = self._posted, []
        for fn in posted:
            self.threads.add(threading.current_thread().name)
            fn()
        return len(posted)

    def run_until(self, cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting on the worker")
            if not self.drain():
                time.sleep(0.001)


@pytest.fixture
def loop() -> Loop:
    return Loop()


@pytest.fixture
def worker(loop: Loop) -> Iterator[Worker]:
    w = Worker("test", loop.post, threads=2, bound=3)
    yield w
    w.stop(timeout_s=5)


def test_results_come_back_through_done_on_the_draining_thread(loop: Loop, worker: Worker) -> None:
    got: list[Any] = []
    ran_on: list[str] = []

    def job(n: int) -> Callable[[], int]:
        def fn() -> int:
            ran_on.append(threading.current_thread().name)
            return n * n

        return fn

    for n in range(3):
        worker.submit(job(n), got.append)
    loop.run_until(lambda: len(got) == 3)
    assert sorted(got) == [0, 1, 4]
    assert all(name.startswith("test-worker-") for name in ran_on)
    assert loop.threads == {threading.current_thread().name}
    assert worker.completed == 3
    assert worker.queued == 0
    assert worker.busy_ns > 0


def test_an_exception_comes_back_through_done(loop: Loop, worker: Worker) -> None:
    got: list[Any] = []

    def boom() -> int:
        raise RuntimeError("database down")

    worker.submit(boom, got.append)
    worker.submit(lambda: 7, got.append)  # the thread survives the exception
    loop.run_until(lambda: len(got) == 2)
    errors = [g for g in got if isinstance(g, BaseException)]
    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError)
    assert str(errors[0]) == "database down"
    assert 7 in got
    assert worker.completed == 2


def test_has_room_goes_false_at_the_bound_and_true_again(loop: Loop, worker: Worker) -> None:
    gate = threading.Event()
    got: list[Any] = []

    def blocked(i: int) -> Callable[[], int]:
        def fn() -> int:
            gate.wait(5)
            return i

        return fn

    assert worker.has_room
    for i in range(2):
        worker.submit(blocked(i), got.append)
        assert worker.has_room
    worker.submit(blocked(2), got.append)
    assert not worker.has_room  # three waiting: the bound
    assert worker.queued == 3
    worker.submit(lambda: 3, got.append)  # beyond the bound: queued all the same, never dropped
    assert worker.queued == 4
    time.sleep(0.05)
    loop.drain()
    assert not worker.has_room  # nothing finished: room comes back only when done ran
    gate.set()
    loop.run_until(lambda: len(got) == 4)
    assert sorted(got) == [0, 1, 2, 3]
    assert worker.has_room
    assert worker.queued == 0


def test_queued_counts_until_done_runs_on_the_network_thread(loop: Loop, worker: Worker) -> None:
    got: list[Any] = []
    worker.submit(lambda: 1, got.append)
    deadline = time.monotonic() + 5
    while not loop._posted and time.monotonic() < deadline:
        time.sleep(0.001)
    assert worker.queued == 1  # finished on the worker thread, but not yet handed back
    assert got == []
    loop.drain()
    assert worker.queued == 0
    assert got == [1]


def test_stop_finishes_queued_jobs(loop: Loop) -> None:
    w = Worker("stopper", loop.post, threads=1, bound=100)
    ran: list[int] = []

    def slow(i: int) -> Callable[[], int]:
        def fn() -> int:
            time.sleep(0.005)
            ran.append(i)
            return i

        return fn

    got: list[Any] = []
    for i in range(20):
        w.submit(slow(i), got.append)
    w.stop(timeout_s=10)
    assert ran == list(range(20))  # every queued job ran, in order, before the threads stopped
    assert not any(t.is_alive() for t in threading.enumerate() if t.name.startswith("stopper-worker-"))
    loop.drain()  # the outcomes posted before the stop still reach done
    assert got == list(range(20))
    assert w.queued == 0


def test_stop_without_start_and_twice_is_harmless(loop: Loop) -> None:
    w = Worker("idle", loop.post)
    w.stop()
    w.start()
    w.stop()
    w.stop()


def test_submit_starts_the_threads(loop: Loop) -> None:
    w = Worker("lazy", loop.post, threads=3)
    assert not any(t.name.startswith("lazy-worker-") for t in threading.enumerate())
    got: list[Any] = []
    w.submit(lambda: "ok", got.append)
    loop.run_until(lambda: got == ["ok"])
    assert {t.name for t in threading.enumerate() if t.name.startswith("lazy-worker-")} == {
        "lazy-worker-0",
        "lazy-worker-1",
        "lazy-worker-2",
    }
    w.stop()


def test_several_threads_run_jobs_at_once(loop: Loop) -> None:
    w = Worker("par", loop.post, threads=3, bound=10)
    barrier = threading.Barrier(3, timeout=5)
    got: list[Any] = []
    for _ in range(3):
        w.submit(barrier.wait, got.append)  # only returns when three run together
    loop.run_until(lambda: len(got) == 3)
    assert sorted(got) == [0, 1, 2]
    w.stop()


@pytest.mark.parametrize(("threads", "bound"), [(0, 1), (1, 0), (-1, 5)])
def test_a_worker_needs_a_thread_and_a_bound(loop: Loop, threads: int, bound: int) -> None:
    with pytest.raises(ValueError, match="at least one"):
        Worker("bad", loop.post, threads=threads, bound=bound)


def test_submit_after_stop_runs_the_job(loop: Loop) -> None:
    w = Worker("again", loop.post)
    got: list[Any] = []
    w.submit(lambda: 1, got.append)
    loop.run_until(lambda: got == [1])
    w.stop()
    w.submit(lambda: 2, got.append)
    loop.run_until(lambda: got == [1, 2])
    w.stop()


def test_a_job_raising_system_exit_still_reaches_done(loop: Loop) -> None:
    w = Worker("exit", loop.post, threads=1)
    got: list[Any] = []

    def leave() -> None:
        raise SystemExit(3)

    w.submit(leave, got.append)
    w.submit(lambda: "after", got.append)
    try:
        loop.run_until(lambda: len(got) == 2, timeout_s=1.0)
    finally:
        w.stop(timeout_s=1.0)
    assert isinstance(got[0], SystemExit)
    assert got[1] == "after"
