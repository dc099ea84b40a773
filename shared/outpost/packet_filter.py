"""Reading MQTT packets below paho: big reads, and shedding a flood before paho parses it.

Why (docs/benchmarks.md, "Overload (issue 14)"): paho reads a packet with at least three ``recv``
calls (its first byte, its remaining length a byte at a time, then the rest) and builds a message
object for it, ~10-12 us a packet on this machine. Under a flood from one device that cost, on the
service's one network thread, is what made every other device wait: Mosquitto sends a subscriber
everything over one connection, in order, so the canaries queue behind the flood.

:class:`FilteringSocket` stands in for the bus's socket in paho (``paho_internals.use_socket``).
It reads up to ``chunk`` bytes a call, finds the packets' boundaries itself, and hands paho only
what it did not consume: paho's three ``recv`` calls then cost three slices. A QoS 0 PUBLISH,
neither retained nor empty, whose topic is in ``shed_topics`` is offered to ``shed(topic,
payload)`` before paho sees it; when that returns True the packet is gone from paho's stream (the
service has counted it: the kit's shed piles, so the dead letters' ``count`` still says how many
there were). QoS 1 and 2 packets are never offered (they need paho's acknowledgement), nor any
other kind of packet.

The parser is defensive (a broker is trusted, but a bug must not become a hang): a remaining length
longer than four bytes or a PUBLISH too short for its topic makes the filter step aside for good and
hand paho the raw bytes, so paho reports the protocol error as it always did. A PUBLISH longer than
``whole_max`` is never held back whole to be looked at: it streams to paho as it comes.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Collection
from typing import Any, Final

CHUNK: Final = 256 * 1024
"""Bytes asked of the kernel per read (one flood packet is ~150 bytes: ~1,700 packets a read)."""

WHOLE_MAX: Final = 64 * 1024
"""Largest QoS 0 PUBLISH held back until complete to be offered for shedding."""

PASS_MAX: Final = 64
"""Packets handed to paho per parse: see :meth:`FilteringSocket._parse`."""

READS_PER_CALL: Final = 4
"""Reads one ``recv`` call makes while everything it read was shed: then it says "nothing yet" so
the network thread runs its timers (flushes, keepalive) between chunks of a flood."""

_PUBLISH: Final = 0x30
_MAX_HEADER: Final = 5  # the first byte and at most four bytes of remaining length


class PacketError(ValueError):
    """The stream cannot be MQTT: a remaining length longer than four bytes."""


def fixed_header(buf: bytes, start: int) -> tuple[int, int] | None:
    """The fixed header of the packet at ``buf[start:]``: (length of the header, remaining length),
    or None while it is not all there. Raises :class:`PacketError` for a remaining length that
    runs past its four bytes (MQTT's limit: 268,435,455)."""
    n = len(buf)
    j = start + 1
    value = 0
    shift = 0
    while True:
        if j >= n:
            return None
        b = buf[j]
        value |= (b & 0x7F) << shift
        j += 1
        if b < 0x80:
            return j - start, value
        shift += 7
        if shift >= 28:
            raise PacketError("remaining length longer than four bytes")


def split_publish(body: bytes, mqtt5: bool) -> tuple[bytes, bytes] | None:
    """(topic, payload) of a QoS 0 PUBLISH's variable header and payload ``body``, or None where
    they do not parse (a topic or properties longer than the packet): paho will refuse it."""
    if len(body) < 2:
        return None
    tlen = (body[0] << 8) | body[1]
    p = 2 + tlen
    if p > len(body):
        return None
    topic = body[2:p]
    if mqtt5:  # properties: a variable byte integer length, then the properties
        plen = 0
        shift = 0
        while True:
            if p >= len(body) or shift >= 28:
                return None
            b = body[p]
            plen |= (b & 0x7F) << shift
            p += 1
            if b < 0x80:
                break
            shift += 7
        p += plen
        if p > len(body):
            return None
    return topic, body[p:]


class FilteringSocket:
    """The bus's socket as paho sees it: buffered reads on MQTT packet boundaries, with QoS 0
    PUBLISH packets on ``shed_topics`` offered to ``shed`` first. Everything else (send, fileno,
    close, options) is the real socket's."""

    def __init__(
        self,
        sock: socket.socket,
        shed_topics: Collection[bytes],
        shed: Callable[[bytes, bytes], bool],
        *,
        mqtt5: bool = False,
        chunk: int = CHUNK,
        whole_max: int = WHOLE_MAX,
        reads_per_call: int = READS_PER_CALL,
        pass_max: int = PASS_MAX,
    ) -> None:
        self.sock = sock
        self._shed_topics = shed_topics
        self._shed = shed
        self._mqtt5 = mqtt5
        self._chunk = chunk
        self._whole_max = whole_max
        self._reads = reads_per_call
        self._pass_max = pass_max
        self._out = b""
        """Bytes for paho, from ``_pos`` on."""
        self._pos = 0
        self._buf = b""
        """Read but not yet parsed, from ``_bpos`` on (which is a packet boundary)."""
        self._bpos = 0
        self._waiting = False
        """What ``_buf`` holds from ``_bpos`` is the start of a packet that has not all arrived (its
        header, or the whole of one that may be shed)."""
        self._pass_left = 0
        """Bytes of the current packet still to come that go to paho as they arrive."""
        self._eof = False
        self._raw = False
        """Set for good after a malformed header: everything goes to paho as read."""
        self.shed_packets = 0
        self.reads = 0

    def set_shedder(self, shed_topics: Collection[bytes], shed: Callable[[bytes, bytes], bool]) -> None:
        self._shed_topics = shed_topics
        self._shed = shed

    # --- what paho calls -------------------------------------------------------------------------
    def recv(self, n: int) -> bytes:
        out = self._out
        if not out:
            if self._eof:
                return b""
            self._fill()  # a BlockingIOError here is paho's "nothing to read now"
            out = self._out
            if not out:
                if self._eof:
                    return b""
                raise BlockingIOError("every packet read so far was shed")
        p = self._pos
        data = out[p : p + n]
        p += len(data)
        if p >= len(out):
            self._out = b""
            self._pos = 0
        else:
            self._pos = p
        return data

    def pending(self) -> int:
        """Bytes read from the socket that paho may get without waiting for it (paho's loop does
        not wait in select() while there are some): parsed ones, and complete packets not yet
        parsed."""
        held = 0 if self._waiting else len(self._buf) - self._bpos
        return len(self._out) - self._pos + held

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: Any) -> int:
        return self.sock.send(data)

    def close(self) -> None:
        self.sock.close()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    # --- reading ---------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Take ``data`` (what the socket gave next) and parse the first of it: see :meth:`_parse`."""
        self._append(data)
        self._parse()

    def _fill(self) -> None:
        """Give paho something: parse what was read and not yet parsed, and read the socket when
        that is used up or ends in an incomplete packet, ``reads_per_call`` reads at most."""
        reads = 0
        while True:
            if not self._waiting and self._bpos < len(self._buf):
                self._parse()
                if self._out:
                    return
                continue  # all of it shed, or an incomplete packet left: read on
            if reads >= self._reads:
                return
            data = self.sock.recv(self._chunk)
            reads += 1
            self.reads += 1
            if not data:
                self._eof = True
                rest = self._buf[self._bpos :]  # a packet cut by the close: paho sees what came of it
                self._buf, self._bpos, self._waiting = b"", 0, False
                if rest:
                    self._add_out(rest)
                return
            self._append(data)

    def _append(self, data: bytes) -> None:
        if self._bpos < len(self._buf):
            self._buf = self._buf[self._bpos :] + data
        else:
            self._buf = data
        self._bpos = 0
        self._waiting = False

    def _add_out(self, passed: bytes) -> None:
        self._out = self._out[self._pos :] + passed if self._out else passed
        self._pos = 0

    def _parse(self) -> None:
        """Parse from ``_bpos``: packets that go to paho are appended to its buffer, shed ones are
        consumed, an incomplete one is kept for the next read. It stops after ``pass_max`` packets
        for paho, so that a topic the service starts shedding while paho handles them is shed from
        the next packets on, not from the next read of the socket (up to ``chunk`` bytes later)."""
        buf = self._buf
        n = len(buf)
        i = self._bpos
        if self._raw:
            self._add_out(buf[i:])
            self._buf, self._bpos = b"", 0
            return
        if self._pass_left:
            k = min(self._pass_left, n - i)
            self._pass_left -= k
            i += k
        runs: list[bytes] = []
        run = self._bpos  # start of the run of bytes that go to paho
        passed = 0
        pass_max = self._pass_max
        shed_topics = self._shed_topics
        waiting = False
        try:
            while i < n and passed < pass_max:
                first = buf[i]
                if first & 0xF7 == _PUBLISH and shed_topics:  # PUBLISH, QoS 0, not retained
                    if n - i >= _MAX_HEADER and buf[i + 1] < 0x80:
                        hlen, rlen = 2, buf[i + 1]
                    else:
                        head = fixed_header(buf, i)
                        if head is None:
                            waiting = True
                            break
                        hlen, rlen = head
                    end = i + hlen + rlen
                    if rlen > self._whole_max:
                        self._pass_left = max(0, end - n)
                        i = min(end, n)
                        passed += 1
                        continue
                    if end > n:
                        waiting = True  # held back until it is all here
                        break
                    t = i + hlen + 2
                    if t <= end:
                        te = t + ((buf[t - 2] << 8) | buf[t - 1])
                        if te <= end and buf[t:te] in shed_topics:
                            parts = split_publish(buf[i + hlen : end], self._mqtt5)
                            if parts is not None and parts[1] and self._shed(*parts):
                                self.shed_packets += 1
                                if i > run:
                                    runs.append(buf[run:i])
                                run = i = end
                                continue
                    i = end
                    passed += 1
                    continue
                if n - i >= _MAX_HEADER and buf[i + 1] < 0x80:  # the common case, inline
                    end = i + 2 + buf[i + 1]
                else:
                    head = fixed_header(buf, i)
                    if head is None:
                        waiting = True
                        break
                    end = i + head[0] + head[1]
                if end > n:
                    self._pass_left = end - n
                    i = n
                    break
                i = end
                passed += 1
        except PacketError:
            self._raw = True
            i = n
        if run == 0 and i == n and not runs:
            out = buf
        else:
            runs.append(buf[run:i])
            out = b"".join(runs)
        if out:
            self._add_out(out)
        if i >= n:
            self._buf, self._bpos = b"", 0
        else:
            self._bpos = i
        self._waiting = waiting
