"""Reading MQTT packets below paho (outpost.packet_filter): boundaries, shedding, hostile input.

No broker: packets are built here and fed to the filter directly (``feed``, cut at every possible
point) or through a socket pair, with a real paho client reading from the filter where paho's view
matters."""

from __future__ import annotations

import random
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from outpost.packet_filter import FilteringSocket, PacketError, fixed_header, split_publish
from outpost.paho_internals import read_waiting, use_socket

SHED = b"outpost/v1/s/dev/flood/telemetry"
KEEP = b"outpost/v1/s/dev/canary/telemetry"


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(
    topic: bytes, payload: bytes, *, qos: int = 0, retain: bool = False, mid: int = 1, mqtt5: bool = False
) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += mid.to_bytes(2, "big")
    if mqtt5:
        body += b"\x00"  # no properties
    body += payload
    return bytes([0x30 | (qos << 1) | int(retain)]) + varint(len(body)) + body


PUBACK = bytes([0x40, 2, 0, 7])
PINGRESP = bytes([0xD0, 0])


class Recorder:
    """What the filter offered for shedding, and what it decided (shed everything offered)."""

    def __init__(self, answer: bool = True) -> None:
        self.offered: list[tuple[bytes, bytes]] = []
        self.answer = answer

    def __call__(self, topic: bytes, payload: bytes) -> bool:
        self.offered.append((topic, payload))
        return self.answer


class ChunkSocket:
    """A socket that gives what it was given, a chunk a recv, then "would block" (or EOF)."""

    def __init__(self, chunks: list[bytes], eof: bool = False) -> None:
        self.chunks = list(chunks)
        self.eof = eof
        self.recvs = 0

    def recv(self, _n: int) -> bytes:
        self.recvs += 1
        if self.chunks:
            return self.chunks.pop(0)
        if self.eof:
            return b""
        raise BlockingIOError


def drain(fs: FilteringSocket) -> bytes:
    """Everything paho would read, in odd-sized pieces, until the socket would block or ends."""
    out = bytearray()
    sizes = [1, 1, 3, 7, 200]
    i = 0
    while True:
        try:
            data = fs.recv(sizes[i % len(sizes)])
        except BlockingIOError:
            return bytes(out)
        if not data:
            return bytes(out)
        out += data
        i += 1


def stream(fs: FilteringSocket, data: bytes, cuts: list[int]) -> bytes:
    """Feed ``data`` cut at ``cuts`` and read what paho would get after each piece."""
    out = bytearray()
    last = 0
    for c in [*cuts, len(data)]:
        fs.feed(data[last:c])
        last = c
        out += drain(fs)
    return bytes(out)


def held(fs: FilteringSocket) -> int:
    """Bytes read and kept back (an incomplete packet)."""
    return len(fs._buf) - fs._bpos


def filt(shed: Any = None, topics: frozenset[bytes] = frozenset({SHED}), **kw: Any) -> FilteringSocket:
    return FilteringSocket(ChunkSocket([]), topics, shed or Recorder(), **kw)  # type: ignore[arg-type]


# --- the fixed header ------------------------------------------------------------------------------
def test_fixed_header_lengths() -> None:
    assert fixed_header(b"\x30\x00", 0) == (2, 0)
    assert fixed_header(b"\x30\x7f", 0) == (2, 127)
    assert fixed_header(b"\x30\x80\x01", 0) == (3, 128)
    assert fixed_header(b"xx\x30\xff\xff\xff\x7f", 2) == (5, 268_435_455)  # MQTT's largest


def test_fixed_header_incomplete_is_none() -> None:
    assert fixed_header(b"\x30", 0) is None
    assert fixed_header(b"\x30\x80", 0) is None
    assert fixed_header(b"\x30\xff\xff\xff", 0) is None


def test_fixed_header_longer_than_four_bytes_is_malformed() -> None:
    with pytest.raises(PacketError):
        fixed_header(b"\x30\xff\xff\xff\xff\x01", 0)
    with pytest.raises(PacketError):
        fixed_header(b"\x30\x80\x80\x80\x80", 0)  # the fifth byte is enough to know


def test_split_publish() -> None:
    body = publish(b"a/b", b"xyz")[2:]
    assert split_publish(body, False) == (b"a/b", b"xyz")
    body5 = publish(b"a/b", b"xyz", mqtt5=True)[2:]
    assert split_publish(body5, True) == (b"a/b", b"xyz")
    props = b"\x00\x03a/b" + b"\x02\x01\x00" + b"xyz"  # two bytes of properties
    assert split_publish(props, True) == (b"a/b", b"xyz")


@pytest.mark.parametrize(
    "body,mqtt5",
    [
        (b"", False),
        (b"\x00", False),
        (b"\x00\x05ab", False),  # a topic longer than the packet
        (b"\x00\x01a", True),  # no property length
        (b"\x00\x01a\x05xy", True),  # properties longer than the packet
        (b"\x00\x01a\xff\xff\xff\xff\x01", True),  # a property length past four bytes
    ],
)
def test_split_publish_refuses_what_does_not_fit(body: bytes, mqtt5: bool) -> None:
    assert split_publish(body, mqtt5) is None


# --- boundaries and shedding -----------------------------------------------------------------------
def mixed() -> tuple[bytes, bytes, int]:
    """A stream of every kind of packet, what paho must get of it, and how many are shed."""
    big = b"v" * 300  # a two-byte remaining length
    packets = [
        (publish(KEEP, b"k1"), True),
        (publish(SHED, b"s1"), False),
        (publish(SHED, big), False),
        (PUBACK, True),
        (publish(SHED, b"q1", qos=1, mid=9), True),  # QoS 1: never shed
        (publish(SHED, b"r", retain=True), True),  # retained: never shed
        (publish(SHED, b""), True),  # empty: never shed (a retained message cleared)
        (publish(KEEP, big), True),
        (PINGRESP, True),
        (publish(SHED, b"s2"), False),
        (publish(SHED, b"s3"), False),
        (publish(KEEP, b"k2"), True),
    ]
    data = b"".join(p for p, _ in packets)
    kept = b"".join(p for p, keep in packets if keep)
    return data, kept, sum(1 for _, keep in packets if not keep)


def test_sheds_only_qos0_publishes_on_marked_topics_and_keeps_the_rest_in_order() -> None:
    data, kept, n_shed = mixed()
    rec = Recorder()
    fs = filt(rec)
    fs.feed(data)
    assert drain(fs) == kept
    assert fs.shed_packets == n_shed
    assert rec.offered == [(SHED, b"s1"), (SHED, b"v" * 300), (SHED, b"s2"), (SHED, b"s3")]


def test_every_cut_of_the_stream_gives_the_same_result() -> None:
    data, kept, n_shed = mixed()
    for cut in range(1, len(data)):
        fs = filt()
        assert stream(fs, data, [cut]) == kept, cut
        assert fs.shed_packets == n_shed
    rng = random.Random(14)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(2, 30)))
        fs = filt()
        assert stream(fs, data, cuts) == kept, cuts


def test_a_refusal_passes_the_packet_to_paho() -> None:
    data, _kept, _ = mixed()
    rec = Recorder(answer=False)
    fs = filt(rec)
    fs.feed(data)
    assert drain(fs) == data
    assert fs.shed_packets == 0
    assert len(rec.offered) == 4


def test_nothing_marked_passes_everything_and_offers_nothing() -> None:
    data, _kept, _ = mixed()
    rec = Recorder()
    fs = filt(rec, topics=frozenset())
    for cut in range(1, len(data), 7):
        fs = filt(rec, topics=frozenset())
        assert stream(fs, data, [cut]) == data
    assert rec.offered == []


def test_mqtt5_payload_after_the_properties() -> None:
    rec = Recorder()
    fs = filt(rec, mqtt5=True)
    keep = publish(KEEP, b"k", mqtt5=True)
    fs.feed(publish(SHED, b"s", mqtt5=True) + keep)
    assert drain(fs) == keep
    assert rec.offered == [(SHED, b"s")]


# --- hostile and broken input ----------------------------------------------------------------------
def test_bad_remaining_length_steps_aside_for_good() -> None:
    rec = Recorder()
    fs = filt(rec)
    bad = b"\x30\xff\xff\xff\xff\x7f" + b"junk"
    later = publish(SHED, b"s")
    fs.feed(publish(SHED, b"s0") + bad)
    fs.feed(later)
    # the shed packet before it is gone; from the bad header on, paho gets the bytes as they came
    assert drain(fs) == bad + later
    assert len(rec.offered) == 1


def test_bad_remaining_length_of_any_packet_type() -> None:
    fs = filt()
    bad = b"\x40\x80\x80\x80\x80\x80"
    fs.feed(PUBACK + bad)
    assert drain(fs) == PUBACK + bad


def test_a_topic_longer_than_its_packet_goes_to_paho() -> None:
    rec = Recorder()
    fs = filt(rec)
    broken = b"\x30\x04\x00\x09ab"  # says a 9-byte topic in a 4-byte packet
    fs.feed(broken + PUBACK)
    assert drain(fs) == broken + PUBACK
    assert rec.offered == []


def test_huge_declared_length_streams_without_holding_it_back() -> None:
    """A QoS 0 PUBLISH claiming 268 MB is not held until complete (it never will be): what comes
    goes to paho as it comes, and nothing after it is parsed as a packet of its own."""
    rec = Recorder()
    fs = filt(rec)
    head = b"\x30\xff\xff\xff\x7f" + len(SHED).to_bytes(2, "big") + SHED
    fs.feed(head + b"p" * 1000)
    assert drain(fs) == head + b"p" * 1000
    inner = publish(SHED, b"s")  # inside the huge packet's body: not a packet
    fs.feed(inner)
    assert drain(fs) == inner
    assert rec.offered == []
    assert held(fs) == 0


def test_a_large_kept_packet_streams_too() -> None:
    fs = filt()
    big = publish(KEEP, b"x" * 200_000, qos=1)
    fs.feed(big[:10])
    assert fs.pending() == 10  # not held back: its header says it is not one to look at
    fs.feed(big[10:])
    assert drain(fs) == big


def test_a_qos0_packet_is_held_only_until_complete() -> None:
    rec = Recorder()
    fs = filt(rec)
    p = publish(SHED, b"s" * 100)
    fs.feed(p[:50])
    assert fs.pending() == 0
    assert held(fs) == 50
    fs.feed(p[50:])
    assert fs.pending() == 0
    assert rec.offered == [(SHED, b"s" * 100)]


def test_truncated_packet_at_eof_reaches_paho_then_eof() -> None:
    p = publish(SHED, b"s" * 100)
    fs = FilteringSocket(ChunkSocket([p[:40]], eof=True), frozenset({SHED}), Recorder())  # type: ignore[arg-type]
    assert drain(fs) == p[:40]
    assert fs.recv(10) == b""
    assert fs.recv(10) == b""


def test_a_topic_marked_while_paho_reads_is_shed_from_the_next_parse_on() -> None:
    """paho gets ``pass_max`` packets a parse: a topic the service starts shedding while paho
    handles them is shed from the next packets on, not only from the next read of the socket."""
    marks: set[bytes] = set()
    rec = Recorder()
    fs = FilteringSocket(ChunkSocket([]), marks, rec, pass_max=4)  # type: ignore[arg-type]
    packets = [publish(SHED, b"%d" % i) for i in range(10)]
    fs.feed(b"".join(packets))
    assert fs.pending() == sum(map(len, packets))  # nothing read from the socket is waited for
    first = fs.recv(10_000)
    assert first == b"".join(packets[:4])
    marks.add(SHED)  # the service shed one of those four
    assert drain(fs) == b""
    assert [p for _t, p in rec.offered] == [b"%d" % i for i in range(4, 10)]
    assert fs.pending() == 0


def test_a_flood_of_shed_packets_does_not_keep_one_recv_call_forever() -> None:
    """While everything read is shed, one recv reads a few chunks and then says "nothing now", so
    the network thread gets back to its timers (flushes, keepalive) between chunks."""
    chunk = publish(SHED, b"s") * 100
    sock = ChunkSocket([chunk] * 50)
    fs = FilteringSocket(sock, frozenset({SHED}), Recorder(), reads_per_call=4)  # type: ignore[arg-type]
    with pytest.raises(BlockingIOError):
        fs.recv(1)
    assert sock.recvs == 4
    assert fs.shed_packets == 400


def test_random_garbage_never_raises_and_loses_nothing_when_nothing_is_shed() -> None:
    rng = random.Random(7)
    for _ in range(300):
        data = rng.randbytes(rng.randint(1, 400))
        rec = Recorder(answer=False)
        fs = filt(rec)
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, 5))) if len(data) > 1 else []
        got = stream(fs, data, cuts)
        # what paho got is a prefix of the input (the rest is an incomplete packet held back)
        assert data.startswith(got)
        assert len(data) - len(got) == held(fs)


# --- with paho reading from it ---------------------------------------------------------------------
def peer_readable(fs: FilteringSocket) -> bool:
    return bool(select.select([fs.sock], [], [], 0)[0])


Pair = tuple[paho.Client, socket.socket, Recorder, FilteringSocket]


@pytest.fixture
def pair() -> Iterator[Pair]:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="packet-filter-test")
    mine, theirs = socket.socketpair()
    mine.setblocking(False)
    rec = Recorder()
    fs = FilteringSocket(mine, frozenset({SHED}), rec, chunk=4096)
    use_socket(client, fs)
    yield client, theirs, rec, fs
    theirs.close()
    mine.close()
    for name in ("_sockpairR", "_sockpairW"):
        s = getattr(client, name, None)
        if s is not None:
            s.close()


def test_paho_reads_what_is_not_shed(
    pair: Pair,
) -> None:
    client, peer, rec, _fs = pair
    got: list[tuple[str, bytes, int]] = []
    client.on_message = lambda _c, _u, m: got.append((m.topic, bytes(m.payload), m.qos))
    peer.sendall(
        publish(KEEP, b"a") + publish(SHED, b"b") + publish(SHED, b"c", qos=1, mid=3) + publish(KEEP, b"d")
    )
    assert read_waiting(client) == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert got == [(KEEP.decode(), b"a", 0), (SHED.decode(), b"c", 1), (KEEP.decode(), b"d", 0)]
    assert rec.offered == [(SHED, b"b")]


def test_paho_does_not_wait_in_select_while_the_filter_holds_bytes(
    pair: Pair,
) -> None:
    """Packets already read from the socket wait in the filter, not in the kernel: paho's loop must
    not wait for the socket to become readable (it would not, until the broker sent more)."""
    client, peer, _rec, fs = pair
    got: list[bytes] = []
    client.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    peer.sendall(publish(KEEP, b"1") + publish(KEEP, b"2") + publish(KEEP, b"3"))
    assert read_waiting(client, limit=1) == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert got == [b"1"]
    assert not peer_readable(fs)  # the other two are in the filter, none in the kernel
    started = time.monotonic()
    assert client.loop(timeout=30) == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert time.monotonic() - started < 15  # not the select()'s 30 s
    read_waiting(client)
    assert got == [b"1", b"2", b"3"]


def test_paho_sees_the_connection_end(
    pair: Pair,
) -> None:
    client, peer, _rec, _fs = pair
    peer.sendall(publish(SHED, b"s"))
    peer.close()
    assert read_waiting(client) == MQTTErrorCode.MQTT_ERR_CONN_LOST
