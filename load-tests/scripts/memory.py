#!/usr/bin/env python3
"""The memory benchmark (operational log): the same code and options as ``outpost bench memory``.

    .venv/bin/python load-tests/scripts/memory.py            # ~15 s: tables
    .venv/bin/python load-tests/scripts/memory.py --json     # one JSON object on the last line
    .venv/bin/python load-tests/scripts/memory.py --sync NORMAL

The harness lives in ``outpost.benchmarks.memory`` (load-tests/outpost/benchmarks/memory.py);
docs/benchmarks.md records what it measured.
"""

import sys

from outpost.cli.main import main

if __name__ == "__main__":
    sys.argv = ["outpost", "bench", "memory", *sys.argv[1:]]
    main()
