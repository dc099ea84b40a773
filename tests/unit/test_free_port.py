"""free_port: a port outside the kernel's ephemeral range, so that no outgoing connection can take
it while a broker on it is down (outpost.broker.LISTEN_PORTS)."""

from __future__ import annotations

import socket

from outpost.broker import LISTEN_PORTS, _ephemeral_low, free_port


def test_ports_are_free_and_below_the_ephemeral_range() -> None:
    ports = {free_port() for _ in range(50)}
    assert len(ports) > 1  # picked at random, not the same one every time
    for port in ports:
        assert LISTEN_PORTS[0] <= port < _ephemeral_low()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))  # free


def test_a_taken_port_is_not_handed_out() -> None:
    held = []
    try:
        for _ in range(20):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", free_port()))
            s.listen()
            held.append(s)
        taken = {s.getsockname()[1] for s in held}
        assert len(taken) == 20
        assert all(free_port() not in taken for _ in range(200))
    finally:
        for s in held:
            s.close()
