#!/usr/bin/env python3
"""The inference benchmark: the same code and options as ``outpost bench inference``.

    .venv/bin/python load-tests/scripts/inference.py                      # ~40 s on 2 cores, tables
    .venv/bin/python load-tests/scripts/inference.py --quick --json       # ~20 s, one JSON object last
    .venv/bin/python load-tests/scripts/inference.py --backend tensorrt   # on a GPU machine

The harness lives in ``outpost.benchmarks.inference`` (load-tests/outpost/benchmarks/inference.py);
docs/benchmarks.md records what it measured.
"""

import sys

from outpost.cli.main import main

if __name__ == "__main__":
    sys.argv = ["outpost", "bench", "inference", *sys.argv[1:]]
    main()
