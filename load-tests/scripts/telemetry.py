#!/usr/bin/env python3
"""The telemetry benchmark: the same code and options as ``outpost bench telemetry``.

    .venv/bin/python load-tests/scripts/telemetry.py            # about 4 minutes: three 60 s windows
    .venv/bin/python load-tests/scripts/telemetry.py --quick    # about 40 s: 4 s windows (a check)
    .venv/bin/python load-tests/scripts/telemetry.py --json     # one JSON object on the last line

The harness lives in ``outpost.benchmarks.telemetry`` (load-tests/outpost/benchmarks/) so the CLI,
this script and the smoke test run the same thing; docs/benchmarks.md records what it measured.
"""

import sys

from outpost.cli.main import main

if __name__ == "__main__":
    sys.argv = ["outpost", "bench", "telemetry", *sys.argv[1:]]
    main()
