#!/usr/bin/env python3
"""MQTT client comparison: the same code and options as ``outpost bench bus``.

    .venv/bin/pip install -e '.[bench]'              # FastStream's MQTT broker, to compare it too
    .venv/bin/python load-tests/scripts/bus_clients.py       # ~1 minute, a table
    .venv/bin/python load-tests/scripts/bus_clients.py --json --client paho --client bus

One publisher process -> one subscriber process through a Mosquitto of its own, QoS 0 and 1,
~126-byte payloads: paho-mqtt (MQTT 3.1.1 and 5), Outpost's bus, aiomqtt (sequential and 100
gathered) and FastStream. docs/bus.md records the figures and why the bus is paho under its own
network thread.
"""

import sys

from outpost.cli.main import main

if __name__ == "__main__":
    sys.argv = ["outpost", "bench", "bus", *sys.argv[1:]]
    main()
