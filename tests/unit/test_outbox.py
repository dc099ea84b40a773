"""The connector gateway's outbox upkeep: settled requests past the retention go, queued ones stay
(its query plan: tests/unit/test_upkeep_plans.py)."""

from __future__ import annotations

from pathlib import Path

from outpost.services.connectors.outbox import FORGET, open_outbox

DAY = 86_400 * 10**9


def _request(
    key: str, received_ns: int, state: str, settled_ns: int | None
) -> tuple[str, tuple[object, ...]]:
    return (
        "INSERT INTO requests (key, id, connector, capability, args, trace, agent, received_ns, state, "
        "settled_ns) VALUES (?, ?, 'store', 'inventory.reorder', '{}', ?, 'restock', ?, ?, ?)",
        (key, f"id-{key}", f"trace-{key}", received_ns, state, settled_ns),
    )


def test_forget_removes_settled_requests_past_the_retention_and_keeps_the_rest(tmp_path: Path) -> None:
    outbox = open_outbox(tmp_path / "outbox.db")
    now = 100 * DAY
    outbox.commit(
        [
            _request("old-done", now - 40 * DAY, "done", now - 40 * DAY),
            _request("old-failed", now - 35 * DAY, "failed", now - 35 * DAY),
            _request("old-queued", now - 60 * DAY, "queued", None),  # still owed: never forgotten
            _request("long-retried", now - 40 * DAY, "done", now - 2 * DAY),  # settled lately
            _request("recent", now - DAY, "done", now - DAY),
        ]
    )
    outbox.commit([(FORGET, (now - 30 * DAY,))])
    left = {k for (k,) in outbox.query("SELECT key FROM requests")}
    assert left == {"old-queued", "long-retried", "recent"}
    outbox.close()
