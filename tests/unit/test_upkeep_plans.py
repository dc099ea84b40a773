"""Retention and upkeep statements read what they delete through an index, never a whole table.

They run on a service's network thread every minute or so, where a scan holds up every message
behind it, and their tables hold up to a month (or a million items). Measured at 100,000 rows on
the 2-core machine before the indexes: 60-77 ms a statement for long-term memory's items, ~109 ms
for the agent's three, 15 ms for the gateway's and the uplink's. SQLite's own plan is the check
(no timings in tests)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from outpost.services.agent.store import FORGET as AGENT_FORGET
from outpost.services.agent.store import open_agent_db
from outpost.services.connectors.outbox import FORGET as OUTBOX_FORGET
from outpost.services.connectors.outbox import open_outbox
from outpost.services.memory.sync import _SCHEMA as SYNC_SCHEMA
from outpost.services.memory.sync import EXPIRE_SUMMARIES, SUMMARIZED
from outpost.services.memory.vectors import AGED_ITEMS, EXPIRE_CHANGES, EXPIRED_ITEMS, LongTermMemory
from outpost.services.uplink.outbox import EXPIRED, Outbox
from outpost.store import Store


def plan(db: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> list[str]:
    return [str(row[-1]) for row in db.execute("EXPLAIN QUERY PLAN " + sql, params)]


def scans(steps: list[str]) -> list[str]:
    """Steps that read a whole table or index ("SCAN t", "SCAN t USING INDEX i"; a SELECT without
    FROM is "SCAN CONSTANT ROW", one row)."""
    return [s for s in steps if s.startswith("SCAN ") and s != "SCAN CONSTANT ROW"]


@pytest.fixture
def dbs(tmp_path: Path) -> Iterator[dict[str, sqlite3.Connection]]:
    ltm = LongTermMemory(tmp_path / "ltm", dim=4, track_changes=True)
    stores = {
        "agent": open_agent_db(tmp_path / "agent.db"),
        "connectors": open_outbox(tmp_path / "outbox.db"),
        "sync": Store(tmp_path / "sync.db", SYNC_SCHEMA),
    }
    uplink = Outbox(tmp_path / "uplink.db")
    yield {name: s.db for name, s in stores.items()} | {"ltm": ltm.db, "uplink": uplink.store.db}
    for s in stores.values():
        s.close()
    uplink.close()
    ltm.close()


CASES = [
    *(("agent", sql, (1,)) for sql in AGENT_FORGET),
    ("connectors", OUTBOX_FORGET, (1,)),
    ("ltm", f"SELECT key FROM items WHERE {EXPIRED_ITEMS}", (1,)),
    ("ltm", f"DELETE FROM items WHERE {EXPIRED_ITEMS}", (1,)),
    ("ltm", f"SELECT key FROM items WHERE {AGED_ITEMS}", (1,)),
    ("ltm", f"DELETE FROM items WHERE {AGED_ITEMS}", (1,)),
    ("ltm", EXPIRE_CHANGES, (1,)),
    ("sync", EXPIRE_SUMMARIES, (1,)),
    ("sync", SUMMARIZED, ()),
    ("uplink", f"SELECT count(*), coalesce(sum(size), 0) FROM records WHERE {EXPIRED}", ("events", 1)),
    ("uplink", f"DELETE FROM records WHERE {EXPIRED}", ("events", 1)),
]


@pytest.mark.parametrize(("store", "sql", "params"), CASES, ids=[f"{c[0]}:{c[1][:48]}" for c in CASES])
def test_an_upkeep_statement_reads_through_an_index(
    dbs: dict[str, sqlite3.Connection], store: str, sql: str, params: tuple[object, ...]
) -> None:
    steps = plan(dbs[store], sql, params)
    assert not scans(steps), steps


def test_the_uplinks_expiry_takes_the_old_records_up_to_the_first_young_one(tmp_path: Path) -> None:
    from outpost.services.uplink.outbox import Taken

    outbox = Outbox(tmp_path / "uplink.db")
    made = [10, 20, 30, 25, 40]  # the clock stepped back once, at the fourth record
    for ns in made:
        outbox.add([Taken("events", "t", b"{}", ns)])
    outbox.add([Taken("alerts", "t", b"{}", 1)])
    assert outbox.expire("events", 26) == 2  # 10 and 20; 25 waits behind 30, which is young
    assert [o for o, _ in outbox.after("events", 0, 10)] == [3, 4, 5]
    assert outbox.expire("events", 100) == 3
    assert outbox.count == 1 and outbox.expire("alerts", 0) == 0
    outbox.close()
