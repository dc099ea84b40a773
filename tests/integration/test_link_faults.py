"""A 10,000-record stream (8 devices, each with its own seq) from the uplink service on an edge
Mosquitto to its cloud side (``outpost cloud run``) on a cloud Mosquitto across the bridge
``outpost up`` writes, each end a real process, through one real fault each: a cloud broker
restart, an edge broker restart, kill -9 of the edge broker, of the uplink and of the cloud side,
a real link cut (a veth pair taken down in a network namespace) and 10% packet loss with 200 ms
delay. Each ends with zero loss, every duplicate recognised (the cloud side skips it; no record is
twice in its table) and each device's order kept.

The ends are a parameter (:class:`tests.linkfaults.Ends`, here :class:`tests.linkfaults_ends.UplinkEnds`);
docs/link-faults.md says more.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.linkfaults import (
    Ends,
    Link,
    Loopback,
    Rig,
    Veth,
    check,
    iptables_missing,
    rig,
    veth_refused,
)
from tests.linkfaults_ends import UplinkEnds

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOTAL = 10_000
FAULT_AT = 3_000
"""The fault strikes once the cloud holds this many: mid-stream, with the producer still going."""

ENDS = [pytest.param(UplinkEnds(), id="uplink")]


def loopback() -> Link:
    return Loopback()


def veth() -> Veth:
    why = veth_refused()
    if why:
        pytest.skip(f"a real link cut needs a network namespace and a veth pair: {why}")
    return Veth()


def run(
    tmp_path: Path,
    site: str,
    ends: Ends,
    link: Link,
    fault: Callable[[Rig], None],
    *,
    delay_s: float = 0.0,
    after: Callable[[Rig], None] | None = None,
) -> None:
    """Push the stream, strike with ``fault`` mid-stream, wait until everything settled, check it
    (and ``after`` it, while the rig still stands)."""
    with rig(tmp_path, site, ends, link, delay_s=delay_s) as r:
        producer = r.produce(TOTAL)
        r.wait_held(FAULT_AT)
        fault(r)
        producer.join()
        held = r.wait_settled(TOTAL)
        check(held, r, TOTAL)
        print(
            f"{site}: {held.records} records held, {held.duplicates} duplicates recognised and skipped"
            + (f"; {held.notes}" if held.notes else "")
        )
        if after is not None:
            after(r)


@pytest.mark.parametrize("ends", ENDS)
def test_cloud_broker_restart(tmp_path: Path, site: str, ends: Ends) -> None:
    run(tmp_path, site, ends, loopback(), lambda r: r.cloud.restart())


@pytest.mark.parametrize("ends", ENDS)
def test_edge_broker_restart(tmp_path: Path, site: str, ends: Ends) -> None:
    run(tmp_path, site, ends, loopback(), lambda r: r.edge.restart())


def kill_edge(r: Rig) -> None:
    r.edge.kill()  # loses what it held since its last autosave: the sender must resend it
    r.edge.start()


def kill_sender(r: Rig) -> None:
    r.sender.kill()
    r.sender.start()


def kill_receiver(r: Rig) -> None:
    r.receiver.kill()
    r.receiver.start()


@pytest.mark.parametrize("ends", ENDS)
@pytest.mark.parametrize("fault", [kill_edge, kill_sender, kill_receiver], ids=lambda f: f.__name__)
def test_kill_9(tmp_path: Path, site: str, ends: Ends, fault: Callable[[Rig], None]) -> None:
    run(tmp_path, site, ends, loopback(), fault)


@pytest.mark.parametrize("ends", ENDS)
def test_link_cut_and_mended(tmp_path: Path, site: str, ends: Ends) -> None:
    """The bridge must find the link dead (its keepalive fails and it drops the connection) while
    the producer goes on; the stream then catches up over the mended link."""

    def cut(r: Rig) -> None:
        assert isinstance(r.link, Veth)
        r.link.cut()
        r.bridge_connected(False)  # its keepalive found the link dead (about 15-20 s)
        r.link.mend()
        r.bridge_connected(True)

    run(tmp_path, site, ends, veth(), cut)


@pytest.mark.parametrize("ends", ENDS)
def test_packet_loss_and_delay(tmp_path: Path, site: str, ends: Ends) -> None:
    """10% of the packets dropped both ways, and 200 ms added each way, for the whole stream."""
    link = veth()
    why = iptables_missing()
    if why:
        link.close()
        pytest.skip(why)
    link.lossy(0.1)

    def dropped(r: Rig) -> None:
        assert link.dropped() > 0, "no packet was dropped: the loss rule did nothing"

    run(tmp_path, site, ends, link, lambda r: None, delay_s=0.2, after=dropped)
