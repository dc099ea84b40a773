#!/usr/bin/env python3
"""The ingest benchmark: the same code and options as ``outpost bench ingest``.

    .venv/bin/python load-tests/scripts/ingest.py            # full run, ~2 minutes on 2 cores, tables
    .venv/bin/python load-tests/scripts/ingest.py --quick    # ~20 s
    .venv/bin/python load-tests/scripts/ingest.py --json     # one JSON object on the last line

The harness lives in ``outpost.benchmarks`` (load-tests/outpost/benchmarks/) so the CLI, this script
and the smoke test run the same thing; docs/benchmarks.md records what it measured.
"""

import sys

from outpost.cli.main import main

if __name__ == "__main__":
    sys.argv = ["outpost", "bench", "ingest", *sys.argv[1:]]
    main()
