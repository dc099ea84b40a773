"""Outpost's benchmarks: ingest, inference, memory, the site under overload, and the MQTT client
comparison.

Each benchmark runs every party in its own process (load generator, subscribers, the service under
test, and a Mosquitto of its own), because on a small gateway the processes compete for the same few
cores and a single-process benchmark would hide that. ``outpost bench NAME`` (and the thin scripts
in ``load-tests/scripts/``) call :mod:`outpost.benchmarks.NAME` (``bus``:
:mod:`outpost.benchmarks.clients`); docs/benchmarks.md records what they measured.

The harnesses are not part of the core: this folder, ``load-tests/outpost/benchmarks/``, is the
package ``outpost.benchmarks`` (load-tests/ holds a portion of the ``outpost`` namespace). It may
import the core and the services; the core and the services never import it (ruff's TID251; see
:mod:`outpost.services.registry`).
"""
