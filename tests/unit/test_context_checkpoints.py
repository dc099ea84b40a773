"""Short-term context (TTL, completion, bounded memory) and checkpoints (atomic, versioned,
compare-and-set, kept history, kill -9 safe)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from outpost.errors import TopicError
from outpost.services.memory.checkpoints import CheckpointConflict, CheckpointError, Checkpoints
from outpost.services.memory.context import ContextError, ShortTermContext
from tests.conftest import kill_9_after


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_ttl_expiry_and_task_completion() -> None:
    clock = Clock()
    ctx = ShortTermContext(default_ttl_s=10, clock=clock)
    ctx.put("task-1", "last", {"v": 1})
    ctx.put("task-1", "short", 5, ttl_s=1)
    ctx.put("fridge-001", "temp", 4.2)
    assert ctx.get("task-1", "last") == {"v": 1}
    clock.t += 2
    assert ctx.get("task-1", "short") is None and ctx.expired == 1
    assert ctx.scope("task-1") == {"last": {"v": 1}}
    assert ctx.complete("task-1") == 1
    assert ctx.scope("task-1") == {} and ctx.get("fridge-001", "temp") == 4.2
    clock.t += 20
    assert ctx.sweep() == 1 and len(ctx) == 0 and ctx.bytes == 0


def test_memory_is_bounded_least_recently_used_goes_first() -> None:
    ctx = ShortTermContext(max_entries=3, clock=Clock())
    for k in "abc":
        ctx.put("s", k, k)
    assert ctx.get("s", "a") == "a"  # a is now the most recently used
    ctx.put("s", "d", "d")
    assert ctx.evicted == 1 and ctx.get("s", "b") is None
    assert sorted(ctx.scope("s")) == ["a", "c", "d"]


@pytest.mark.parametrize(
    ("scope", "key", "value", "error"),
    [
        ("bad scope", "k", 1, TopicError),
        ("s/+", "k", 1, TopicError),
        ("s", "", 1, ContextError),
        ("s", "k" * 300, 1, ContextError),
        ("s", "k", object(), ContextError),
        ("s", "k", "x" * 70_000, ContextError),
    ],
)
def test_bad_requests_are_refused(scope: str, key: str, value: object, error: type[Exception]) -> None:
    ctx = ShortTermContext()
    with pytest.raises(error):
        ctx.put(scope, key, value)
    assert len(ctx) == 0


def test_the_values_in_all_are_bounded_too() -> None:
    ctx = ShortTermContext(max_entries=1000, max_bytes=10_000)
    for i in range(10):
        ctx.put("s", f"k{i}", "x" * 2000)  # 2,002 bytes of JSON each
    assert len(ctx) == 4 and ctx.bytes <= 10_000
    assert ctx.get("s", "k0") is None and ctx.get("s", "k9") is not None  # the oldest went
    assert ctx.scope_bytes("s") == 4 * 2002 and ctx.scope_bytes("other") == 0


def test_context_is_safe_from_many_threads() -> None:
    ctx = ShortTermContext(max_entries=500)

    def work(n: int) -> None:
        for i in range(2000):
            ctx.put(f"t{n}", f"k{i % 300}", i)
            ctx.get(f"t{n}", f"k{(i * 7) % 300}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(ctx) <= 500 and ctx.bytes > 0


def test_checkpoints_are_versioned_and_compare_and_set(tmp_path: Path) -> None:
    cp = Checkpoints(tmp_path / "cp.db", keep=3)
    assert cp.load("task-1") is None
    assert cp.save("task-1", "fetch", {"page": 1}, expect=0) == 1
    assert cp.save("task-1", "fetch", {"page": 2}, expect=1) == 2
    with pytest.raises(CheckpointConflict, match="at version 2, not 1"):
        cp.save("task-1", "fetch", {"page": 9}, expect=1)  # a second worker with a stale view
    for page in (3, 4, 5):
        cp.save("task-1", "fetch", {"page": page})
    last = cp.load("task-1")
    assert last is not None and (last.version, last.step, last.state) == (5, "fetch", {"page": 5})
    assert [v for v, _, _ in cp.history("task-1")] == [5, 4, 3]  # keep=3
    older = cp.load("task-1", version=4)
    assert older is not None and older.state == {"page": 4}
    cp.close()
    again = Checkpoints(tmp_path / "cp.db")
    resumed = again.load("task-1")
    assert resumed is not None and resumed.version == 5  # resumes after a restart
    assert again.delete("task-1") == 3 and again.load("task-1") is None
    with pytest.raises(CheckpointError):
        again.save("", "s", {})
    with pytest.raises(CheckpointError, match="JSON"):
        again.save("t", "s", {1, 2})
    with pytest.raises(CheckpointError, match="bytes"):
        again.save("t", "s", "x" * (1024 * 1024 + 1))
    again.close()


SAVER = """
import sys
from pathlib import Path
from outpost.services.memory.checkpoints import Checkpoints
cp = Checkpoints(Path(sys.argv[1]))
v = 0
while True:
    v = cp.save("job", f"step-{v + 1}", {"done": v + 1, "pad": "x" * 2000}, expect=v)
    print(v, flush=True)
"""


def test_kill_9_during_saves_leaves_the_last_acknowledged_checkpoint_whole(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    acked = kill_9_after(SAVER, str(path), 300)
    cp = Checkpoints(path)
    last = cp.load("job")
    assert last is not None and last.version >= acked
    assert last.state["done"] == last.version and last.step == f"step-{last.version}"
    cp.close()
