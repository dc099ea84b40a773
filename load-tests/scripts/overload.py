#!/usr/bin/env python3
"""The overload benchmark: the same code and options as ``outpost bench overload``.

    .venv/bin/python load-tests/scripts/overload.py            # ~2 minutes: baseline, flood, bad batches
    .venv/bin/python load-tests/scripts/overload.py --quick    # ~40 s
    .venv/bin/python load-tests/scripts/overload.py --json     # one JSON object on the last line

The harness lives in ``outpost.benchmarks.overload`` (load-tests/outpost/benchmarks/) so the CLI, this
script and the smoke test run the same thing; docs/benchmarks.md records what it measured.
"""

import sys

from outpost.cli.main import main

if __name__ == "__main__":
    sys.argv = ["outpost", "bench", "overload", *sys.argv[1:]]
    main()
