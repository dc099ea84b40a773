"""The spool: every rollup point is written here (SQLite, :mod:`outpost.store`, under the site's
data folder) before it is sent, and leaves only once the store has taken it. While the store or
the link is down points wait here, and are written later with their original timestamps, in the
order they were rolled up; a kill -9 of the service loses nothing that reached the spool.

It is bounded (``spool_max_mb``, counted as the points' line bytes): when an append would pass the
bound, the **oldest diagnostics** give way first, then the oldest SLO points; alerts never do (a
spool of nothing but alerts may pass its bound rather than lose one). What gives way is counted by
priority (:attr:`Spool.dropped`), so the policy is visible in the service's metrics.

Only the service's worker thread uses a spool.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from outpost.services.telemetry.budget import Pending, size_of
from outpost.services.telemetry.catalog import Point, Priority
from outpost.store import Store, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    priority INTEGER NOT NULL,
    ts_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    line TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS points_by_priority ON points (priority, seq);
"""


class Spool:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.store = Store(path, SCHEMA, synchronous="NORMAL")  # survives a process crash
        self.max_bytes = max_bytes
        row = self.store.one("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM points")
        self.count, self.bytes = (int(row[0]), int(row[1])) if row else (0, 0)
        self.dropped: Counter[Priority] = Counter()

    def append(self, points: Sequence[Point]) -> Counter[Priority]:
        """Spool ``points`` in order (one transaction), making room by the policy; returns what
        gave way, by priority (also added to :attr:`dropped`)."""
        rows = [(int(p.priority), p.ts_ns, size_of(p), p.line()) for p in points]
        added = sum(r[2] for r in rows)
        gone: Counter[Priority] = Counter()
        with transaction(self.store.db) as db:
            db.executemany("INSERT INTO points (priority, ts_ns, size, line) VALUES (?, ?, ?, ?)", rows)
            total, count = self.bytes + added, self.count + len(rows)
            for prio in (Priority.DIAGNOSTIC, Priority.SLO):
                while total > self.max_bytes:
                    victims = db.execute(
                        "SELECT seq, size FROM points WHERE priority = ? ORDER BY seq LIMIT 500",
                        (int(prio),),
                    ).fetchall()
                    if not victims:
                        break
                    cut: list[tuple[int]] = []
                    for seq, size in victims:
                        if total <= self.max_bytes:
                            break
                        cut.append((seq,))
                        total -= size
                    db.executemany("DELETE FROM points WHERE seq = ?", cut)
                    gone[prio] += len(cut)
                    count -= len(cut)
        self.bytes, self.count = total, count
        self.dropped.update(gone)
        return gone

    def head(self, per_priority: int) -> list[Pending]:
        """The oldest ``per_priority`` points of each priority, oldest first within each."""
        out: list[Pending] = []
        for prio in Priority:
            for seq, size in self.store.query(
                "SELECT seq, size FROM points WHERE priority = ? ORDER BY seq LIMIT ?",
                (int(prio), per_priority),
            ):
                out.append(Pending(int(seq), prio, int(size)))
        return out

    def lines(self, seqs: Sequence[int]) -> list[str]:
        """The lines of ``seqs``, in seq order (the order they were rolled up)."""
        out: list[str] = []
        ordered = sorted(seqs)
        for i in range(0, len(ordered), 500):
            chunk = ordered[i : i + 500]
            marks = ",".join("?" * len(chunk))
            out += [
                r[0]
                for r in self.store.query(
                    f"SELECT line FROM points WHERE seq IN ({marks}) ORDER BY seq", chunk
                )
            ]
        return out

    def remove(self, taken: Sequence[Pending]) -> None:
        """The store has these: they leave the spool."""
        self.store.write_many("DELETE FROM points WHERE seq = ?", [(p.seq,) for p in taken])
        self.count -= len(taken)
        self.bytes -= sum(p.size for p in taken)

    def close(self) -> None:
        self.store.close()
