"""The uplink's cloud side: every site's uplink streams received, stored and acknowledged
(``outpost cloud run``; docs/uplink.md).

It subscribes to ``up/uplink/+`` of every site of the installation on the cloud broker (QoS 1,
a durable session) and applies each message with the receiver protocol of :mod:`outpost.streams`
(``prev`` must match what it holds; a record already held is skipped; a gap waits for the site's
resend; a history it does not hold is answered ``unknown`` and the site sends the stream again),
in one transaction of its :class:`~.store.CloudStore` (PostgreSQL or SQLite), and only then
answers on that site's ``down/uplink/ack`` with the last offset it has committed. A record the
site took twice (its producer's message redelivered after a kill) is recognised by its id and
stored once.

While the database fails, messages are left unanswered (counted ``db_errors``, the status says
``degraded`` with the error): the sites send them again, and a new connection is made for the next.

A message that is not a valid uplink message of the site its topic names is dead-lettered on the
cloud side's own ``dlq/cloud`` (``bad_batch``); a record that cannot be stored alone, as
``bad_record``, and its stream goes on.
"""

from __future__ import annotations

from typing import Literal

from outpost.contracts import StreamBatch, model_contract
from outpost.log import get_logger
from outpost.service import ServiceRuntime
from outpost.services.registry import OutpostSettings
from outpost.services.uplink.service import PART
from outpost.services.uplink.store import CloudStore
from outpost.streams import receive_streams, start_receiving

NAME = "cloud"
log = get_logger("outpost.services.uplink.cloud")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class UplinkBatch(StreamBatch):
    """A :class:`~outpost.contracts.StreamBatch` of one of the uplink's streams."""

    stream: Literal["alerts", "decisions", "actions", "memory", "metrics", "events"]


UPLINK_BATCH = model_contract(UplinkBatch)


class CloudUplink:
    """Runs on its kit's network thread; the database calls block it (one transaction a message)."""

    def __init__(self, settings: OutpostSettings, store: CloudStore) -> None:
        self.settings = settings
        self.store = store
        self.rt = ServiceRuntime(
            NAME, settings, reasons=("bad_batch", "bad_record"), durable=True, mqtt5=False
        )
        self.metrics = self.rt.metrics
        receive_streams(
            self.rt, PART, UPLINK_BATCH, store.apply, bad="bad_batch", max_bytes=MAX_MESSAGE_BYTES
        )

    def start(self) -> None:
        start_receiving(self.rt, "the cloud side", self.store.url_kind)

    def stop(self) -> None:
        try:
            self.rt.stop()
        finally:
            self.store.close()
