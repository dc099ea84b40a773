#!/usr/bin/env python3
"""The connectors benchmark: the same code and options as ``outpost bench connectors``.

    .venv/bin/python load-tests/scripts/connectors.py            # about 2 minutes: every phase
    .venv/bin/python load-tests/scripts/connectors.py --quick    # about 40 s
    .venv/bin/python load-tests/scripts/connectors.py --json     # one JSON object on the last line

The harness lives in ``outpost.benchmarks.connectors`` (load-tests/outpost/benchmarks/) so the CLI, this
script and the smoke test run the same thing; docs/benchmarks.md records what it measured.
"""

import sys

from outpost.cli.main import main

if __name__ == "__main__":
    sys.argv = ["outpost", "bench", "connectors", *sys.argv[1:]]
    main()
