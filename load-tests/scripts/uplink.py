#!/usr/bin/env python3
"""The uplink benchmark: the same code and options as ``outpost bench uplink``.

    .venv/bin/python load-tests/scripts/uplink.py                      # ~10 min: a 300 s outage
    .venv/bin/python load-tests/scripts/uplink.py --outage-s 20 --json # one JSON object on the last line
    .venv/bin/python load-tests/scripts/uplink.py --db postgresql://postgres@127.0.0.1:5432/test

The harness lives in ``outpost.benchmarks.uplink`` (load-tests/outpost/benchmarks/uplink.py);
docs/benchmarks.md records what it measured.
"""

import sys

from outpost.cli.main import main

if __name__ == "__main__":
    sys.argv = ["outpost", "bench", "uplink", *sys.argv[1:]]
    main()
