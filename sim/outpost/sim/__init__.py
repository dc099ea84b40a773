"""The Outpost device simulator: seeded fleets of realistic devices publishing over MQTT.

Public API:

* :func:`run` (``outpost.sim.run(SimOptions(...)) -> SimReport``): publish against a broker with
  several paho-mqtt processes and report what was sent;
* :func:`build_fleet` and ``SimDevice.next_readings()``: the same readings without a broker;
* :class:`DeviceStream`: the exact payloads (batches, bad items) a device would publish.

``outpost sim`` (shared/outpost/cli/sim.py) is the command-line face of :func:`run`.
"""

from outpost.sim.badinput import ALL_KINDS, EXPECTED_REASON, MESSAGE_LEVEL, BadKind, make_bad
from outpost.sim.options import SimOptions
from outpost.sim.report import SimReport
from outpost.sim.runner import run
from outpost.sim.scenario import SCENARIOS, DeviceSpec, SimDevice, build_fleet, fleet_specs
from outpost.sim.stream import DeviceStream, Outgoing

__all__ = [
    "ALL_KINDS",
    "EXPECTED_REASON",
    "MESSAGE_LEVEL",
    "SCENARIOS",
    "BadKind",
    "DeviceSpec",
    "DeviceStream",
    "Outgoing",
    "SimDevice",
    "SimOptions",
    "SimReport",
    "build_fleet",
    "fleet_specs",
    "make_bad",
    "run",
]
