"""The ends the link-fault tests (tests/integration/test_link_faults.py) run in the harness of
:mod:`tests.linkfaults`: the uplink service and its cloud side, each a real process.

* The sender: ``python -m outpost.services.uplink`` on the edge broker, taking every device's events
  (``uplink.events: ["*"]``), its outbox in the rig's folder (a kill -9 and a start find it again),
  ``uplink.resend_s`` 1 (the default 5 s would only make each fault take longer to settle), the rest
  its defaults. ``uplink.cloud`` names the cloud broker as the edge's bridge reaches it.
* The receiver: ``outpost cloud run --db sqlite:////{workdir}/cloud.db --broker HOST:PORT`` on the
  cloud broker, under the link's prefix (in the namespace of a veth link), site ``cloud``.

:class:`UplinkProbe` publishes the records as ingest does (per device a JSON list of its events,
each with the id ``{device}-{seq}``, on ``{root}/events/{device}`` at QoS 1) and reads both ends'
databases: the cloud's ``records`` (what it holds, in the order it stored them) and the outbox (what
the site still holds).
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from outpost.bus import Bus
from outpost.datadir import site_path
from outpost.services.registry import OutpostSettings
from outpost.settings import MqttSettings
from tests.conftest import OUTPOST, Collector, make_event, wait_status, wait_until
from tests.linkfaults import End, Held, Rig

CLOUD_SITE = "cloud"
"""The cloud side's own site: its status and metrics are under it on the cloud broker."""

CLOUD_DB = "cloud.db"
STREAM = "events"

TAKE_S = 3.0
"""How long the uplink is given to take a message before a probe that saw the edge broker restart
publishes it again (the restarted broker may have lost it)."""

PUT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class UplinkEnds:
    """The uplink service and ``outpost cloud run``."""

    resend_s: float = 1.0

    def sender(self, rig: Rig) -> End:
        env = rig.env("127.0.0.1", rig.edge.port) | {
            "OUTPOST_UPLINK__CLOUD": rig.cloud_at,
            "OUTPOST_UPLINK__EVENTS": '["*"]',
            "OUTPOST_UPLINK__RESEND_S": str(self.resend_s),
        }
        return End([sys.executable, "-m", "outpost.services.uplink"], env)

    def receiver(self, rig: Rig) -> End:
        db = f"sqlite:///{(rig.workdir / CLOUD_DB).resolve()}"  # an absolute path: four slashes
        broker = f"{rig.link.cloud_host}:{rig.cloud.port}"
        return End(
            [*OUTPOST, "cloud", "run", "--db", db, "--broker", broker],
            rig.env(rig.link.cloud_host, rig.cloud.port, site=CLOUD_SITE),
        )

    def probe(self, rig: Rig) -> UplinkProbe:
        return UplinkProbe(rig)


class RunCounters(Collector):
    """The cloud side's metrics: each run's counters as it last published them (a run's counters
    start from 0; one killed with kill -9 loses what it counted after its last publish, 1 s)."""

    def __init__(self, mqtt: MqttSettings, pattern: str, *, client_id: str) -> None:
        self.runs: dict[int, dict[str, int]] = {}
        self.last_ns = 0
        """When the last metrics message was made (wall ns)."""
        super().__init__(mqtt, pattern, client_id=client_id)

    def _on(self, msg: Any) -> None:
        doc = orjson.loads(msg.payload)
        with self.lock:
            self.runs[int(doc["started"])] = doc["counters"]
            self.last_ns = max(self.last_ns, int(doc["ts"]))

    def total(self, *names: str) -> int:
        with self.lock:
            return sum(c.get(n, 0) for c in self.runs.values() for n in names)


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    ids: frozenset[str]


@contextlib.contextmanager
def reading(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to another process's SQLite database (WAL: it never blocks it)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        yield db
    finally:
        db.close()


class UplinkProbe:
    """Made once both ends run: it waits until both said they are online (subscribed), so the
    first records go to the uplink's session and its first messages to the cloud side's."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.outbox = site_path(rig.data_dir(), rig.site, "uplink", "outbox.db")
        self.cloud_db = rig.workdir / CLOUD_DB
        edge = OutpostSettings(site=rig.site, data_dir=rig.data_dir())
        edge.mqtt.port = rig.edge.port
        cloud = OutpostSettings(site=CLOUD_SITE, data_dir=rig.data_dir(CLOUD_SITE))
        cloud.mqtt.host, cloud.mqtt.port = rig.link.cloud_host, rig.cloud.port
        wait_status(cloud, "cloud")
        wait_status(edge, "uplink")
        self.topics = edge.topics
        self.counters = RunCounters(
            cloud.mqtt, cloud.topics.metrics("cloud"), client_id=f"counters-{rig.site}"
        )
        self.counters.start()
        self.bus = Bus(edge.mqtt, client_id=f"producer-{rig.site}")
        self.bus.start()
        assert rig.edge.proc is not None
        self.edge_pid = rig.edge.proc.pid
        self.republished = 0

    def put(self, records: list[tuple[str, int]]) -> None:
        """Publish the records, then wait until the uplink has taken every one into its outbox (as
        a producer that must not lose them would: the edge broker's PUBACK is not durability). Once
        the edge broker has been restarted, a message still not taken after :data:`TAKE_S` is
        published again (the broker lost it, or the uplink's session with it); never otherwise, so
        a record the uplink acknowledged without keeping it shows as lost. A copy it then takes
        twice is the cloud's to recognise by its id."""
        events: dict[str, list[dict[str, Any]]] = {}
        for device, seq in records:
            events.setdefault(device, []).append(make_event(device, seq, "temperature", float(seq)))
        messages = [
            Message(self.topics.events(d), orjson.dumps(evs), frozenset(e["id"] for e in evs))
            for d, evs in events.items()
        ]
        mark = self._outbox_last()  # whatever the outbox takes from here on has a later offset
        for m in messages:
            self.bus.publish(m.topic, m.payload, qos=1)
        deadline = time.monotonic() + PUT_TIMEOUT_S
        left = messages
        while True:
            wait_until(lambda: not self._missing(left, mark), TAKE_S)
            if not (left := self._missing(left, mark)):
                return
            assert time.monotonic() < deadline, f"the uplink never took {sum(len(m.ids) for m in left)}"
            assert self.rig.edge.proc is not None
            if self.rig.edge.proc.pid != self.edge_pid:
                for m in left:
                    self.bus.publish(m.topic, m.payload, qos=1)
                self.republished += len(left)

    def _missing(self, messages: list[Message], mark: int) -> list[Message]:
        taken = self._taken_after(mark)
        return [m for m in messages if not m.ids <= taken]

    def _outbox_last(self) -> int:
        with reading(self.outbox) as db:
            row = db.execute("SELECT last FROM offsets WHERE stream = ?", (STREAM,)).fetchone()
        return int(row[0]) if row else 0

    def _taken_after(self, mark: int) -> set[str]:
        """The ids of what the uplink took after offset ``mark``: in its outbox, or gone from it
        because the cloud has them. The outbox is read first: the cloud commits a record before
        the outbox lets it go, so one read from neither was not taken when the outbox was read."""
        with reading(self.outbox) as db:
            rows = db.execute(
                'SELECT body FROM records WHERE stream = ? AND "offset" > ?', (STREAM, mark)
            ).fetchall()
        ids = {str(orjson.loads(body)["id"]) for (body,) in rows}
        with reading(self.cloud_db) as db:
            rows = db.execute(
                'SELECT id FROM records WHERE site = ? AND stream = ? AND "offset" > ?',
                (self.rig.site, STREAM, mark),
            ).fetchall()
        return ids | {str(i) for (i,) in rows}

    def held(self) -> Held:
        """The cloud's records in the order it stored them (``rowid``: the table only grows). Its
        ``records`` are unique per (site, stream, id), so a copy that got past the receiver's offsets
        is dropped by its id, not stored twice; both kinds of copies count as recognised."""
        with reading(self.cloud_db) as db:
            rows = db.execute(
                "SELECT device, seq FROM records WHERE site = ? AND stream = ? ORDER BY rowid",
                (self.rig.site, STREAM),
            ).fetchall()
        by_device: dict[str, list[int]] = {}
        for device, seq in rows:
            by_device.setdefault(str(device), []).append(int(seq))
        taken = self._outbox_last()
        return Held(
            by_device,
            self.counters.total("duplicates", "duplicate_ids"),
            f"the site took {taken - len(rows)} records twice; {self.republished} messages published again",
        )

    def backlog(self) -> int:
        with reading(self.outbox) as db:
            return int(db.execute("SELECT count(*) FROM records").fetchone()[0])

    def settle(self) -> None:
        """Until the cloud side has published its counters once more (every second)."""
        now = time.time_ns()
        assert wait_until(lambda: self.counters.last_ns > now, 15), "the cloud side published no metrics"

    def close(self) -> None:
        self.bus.stop(drain_s=1)
        self.counters.stop()
