#!/usr/bin/env python3
"""The idle benchmark: the same code and options as ``outpost bench idle``.

    .venv/bin/python load-tests/scripts/idle.py              # about 50 s: 30 s measured
    .venv/bin/python load-tests/scripts/idle.py --no-cloud   # the site without a cloud configured
    .venv/bin/python load-tests/scripts/idle.py --json       # one JSON object on the last line

The harness lives in ``outpost.benchmarks.idle`` (load-tests/outpost/benchmarks/) so the CLI, this
script and the smoke test run the same thing; docs/benchmarks.md records what it measured.
"""

import sys

from outpost.cli.main import main

if __name__ == "__main__":
    sys.argv = ["outpost", "bench", "idle", *sys.argv[1:]]
    main()
