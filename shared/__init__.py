"""Outpost: an AI edge operating layer for IoT gateways.

`outpost` is the shared library every service imports (settings, topics, envelopes, the MQTT bus,
storage, metrics); `outpost.services.*` are the services and `outpost.sim` the device simulator.
"""

__version__ = "0.1.0"
