"""Long-term memory on real SQLite and a real usearch index: similarity with filters, TTL and
eviction (age, budget, least recently used), deletion by subject, persistence, and rebuilding the
index from SQLite when its file is lost or damaged."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from outpost.services.memory.vectors import LongTermMemory, VectorMemoryError

DIM = 16


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


@pytest.fixture
def mem(tmp_path: Path) -> LongTermMemory:
    return LongTermMemory(tmp_path / "ltm", dim=DIM)


def test_nearest_first_within_namespace_subject_and_meta(mem: LongTermMemory) -> None:
    for i in range(200):
        mem.add(
            "situations",
            vec(i),
            {"i": i},
            subject=f"dev-{i % 5}",
            meta={"kind": "fridge" if i % 2 else "shelf"},
        )
    mem.add("notes", vec(7), {"note": True})
    hits = mem.search("situations", vec(7), k=3)
    assert hits[0].payload == {"i": 7} and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(h.namespace == "situations" for h in hits)
    only = mem.search("situations", vec(7), k=5, subject="dev-3", where={"kind": "shelf"})
    assert only and all(h.subject == "dev-3" and h.meta["kind"] == "shelf" for h in only)
    assert mem.search("notes", vec(7), k=10)[0].payload == {"note": True}
    assert mem.search("nothing-here", vec(7)) == []


def test_ttl_age_and_least_recently_used_eviction(mem: LongTermMemory) -> None:
    short = mem.add("n", vec(1), "short", ttl_s=0.05)
    keys = [mem.add("n", vec(100 + i), i) for i in range(10)]
    time.sleep(0.1)
    assert all(h.key != short for h in mem.search("n", vec(1), k=10))  # expired: never returned
    mem.search("n", vec(100), k=1)  # touches keys[0]: recently used
    ev = mem.evict(max_items=5)
    assert ev.expired == 1 and ev.over_budget == 5 and len(mem) == 5
    left = {h.key for h in mem.search("n", vec(100), k=10)}
    assert keys[0] in left
    assert mem.evict(max_age_s=0).aged == 5 and len(mem) == 0


def test_delete_by_subject_for_privacy_requests(mem: LongTermMemory) -> None:
    for i in range(50):
        mem.add("n", vec(i), i, subject="alice" if i % 3 == 0 else "bob")
    assert mem.delete_subject("alice") == 17
    assert all(h.subject == "bob" for h in mem.search("n", vec(0), k=50))
    assert len(mem.index) == len(mem) == 33
    with pytest.raises(VectorMemoryError):
        mem.delete_subject("")


def test_persistence_and_rebuild_from_sqlite(tmp_path: Path) -> None:
    folder = tmp_path / "ltm"
    mem = LongTermMemory(folder, dim=DIM)
    keys = [mem.add("n", vec(i), i) for i in range(100)]
    mem.delete(keys[0])
    mem.close()
    again = LongTermMemory(folder, dim=DIM)
    assert not again.rebuilt and len(again) == 99
    assert again.search("n", vec(5), k=1)[0].payload == 5
    again.add("n", vec(500), 500)  # added after the last save: the index file is behind now
    again.store.close()  # a crash: no save
    (folder / "vectors.usearch").write_bytes(b"garbage")
    third = LongTermMemory(folder, dim=DIM)
    assert third.rebuilt and len(third.index) == 100
    assert third.search("n", vec(500), k=1)[0].payload == 500
    third.close()


@pytest.mark.parametrize(
    "bad",
    [[1.0] * (DIM - 1), [float("nan")] * DIM, [0.0] * DIM, "text", [[1.0] * DIM, [1.0] * DIM]],
)
def test_bad_vectors_are_refused(mem: LongTermMemory, bad: object) -> None:
    with pytest.raises(VectorMemoryError):
        mem.add("n", bad, {})
    assert len(mem) == 0


def test_bad_payloads_and_queries_are_refused(mem: LongTermMemory) -> None:
    with pytest.raises(VectorMemoryError, match="bytes"):
        mem.add("n", vec(1), "x" * 70_000)
    with pytest.raises(VectorMemoryError, match="JSON"):
        mem.add("n", vec(1), {1, 2})
    with pytest.raises(VectorMemoryError, match="flat"):
        mem.add("n", vec(1), {}, meta={"x": [1]})  # type: ignore[dict-item]
    with pytest.raises(VectorMemoryError, match="k must"):
        mem.search("n", vec(1), k=0)


def test_add_many_in_one_transaction(mem: LongTermMemory) -> None:
    keys = mem.add_many("bulk", np.stack([vec(i) for i in range(300)]), [{"i": i} for i in range(300)])
    assert len(set(keys)) == 300 and len(mem) == len(mem.index) == 300
    assert mem.search("bulk", vec(42), k=1)[0].payload == {"i": 42}
    one = mem.add("bulk", vec(999), "after")
    assert one > max(keys)
    with pytest.raises(VectorMemoryError):
        mem.add_many("bulk", np.zeros((2, DIM)), [1, 2])


def test_onnxruntime_loads_beside_the_index() -> None:
    """usearch loaded before onnxruntime crashes the process (see vectors.py): a fresh interpreter
    that imports long-term memory first, then the text encoder, runs both."""
    code = (
        "from outpost.services.memory.vectors import LongTermMemory\n"
        "import onnxruntime, tempfile, pathlib\n"
        "m = LongTermMemory(pathlib.Path(tempfile.mkdtemp()), dim=2)\n"
        "m.add('n', [1.0, 0.0], 1)\n"
        "print(onnxruntime.get_available_providers()[-1], len(m.search('n', [1.0, 0.0])))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert p.stdout.split() == ["CPUExecutionProvider", "1"]
